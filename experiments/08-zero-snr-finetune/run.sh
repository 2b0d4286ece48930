#!/usr/bin/env bash
# Experiment 8 (Lin et al. 2023, 003 document, section 5): the fine-tune. A small text-to-image model is trained from
# scratch with Stable Diffusion 1.x's flawed settings (scaled_linear schedule, terminal SNR 0.0047, eps prediction,
# leading spacing) on Fashion-MNIST with a per-image brightness, captioned from the class and the brightness ("a dark
# photo of a sneaker", "a bright photo of a bag", "a photo of a coat"). It is then fine-tuned two ways with
# `diffuse train --model`, for the same steps:
#   unchanged: the same flawed settings;
#   recipe:    zero terminal SNR (--zero-snr), v prediction with the v loss, trailing spacing in scheduler/.
# Both sample with DDIM 50 steps, trailing, w = 7.5, phi = 0.7 (the document's evaluation settings) for
#   - the captions of the first 1000 test images (the data's mix): FID-FMNIST against the same brightness-spread test
#     split, and W1 of per-image brightness (diffuse analyze brightness);
#   - "a dark photo of a X" and "a bright photo of a X" for the 10 classes: the mean brightness of what each prompt
#     gives against the data's mean for that caption (the claim: the flawed model cannot make very dark or very bright
#     images when asked).
# The pipeline is made by build/fmnist_text_pipeline (examples/): an RGB autoencoder from train-vae (32x32x3 ->
# 4x8x8), the shared fixtures' tiny CLIP text encoder (random weights, 32 wide) and a fresh UNet2DConditionModel.
# Usage: experiments/08-zero-snr-finetune/run.sh      (about 70 minutes on 2 cores)
source "$(dirname "$0")/../common.sh"
out=$root/out/experiments/08
tool=$root/build/fmnist_text_pipeline
[ -x "$tool" ] || { echo "error: $tool not built (cmake --build build --target fmnist_text_pipeline)" >&2; exit 1; }
mkdir -p "$out"
images=${IMAGES:-10000}; base_steps=${BASE_STEPS:-3000}; tune_steps=${TUNE_STEPS:-1000}; n=${SAMPLES:-1000}

train_run train-vae "$runs/vae-rgb-brightness" --data fashion-mnist-brightness --image-channels 3 --channels 32,64,128 \
  --layers-per-block 1 --latent-channels 4 --steps 1500 --batch 32 --lr 1e-3 --warmup 100 --ema-decay 0.999 --kl-weight 1e-6
[ -f "$out/captions/000000.txt" ] || "$tool" captions "$out/captions" "$images" > "$out/caption-stats.csv"
[ -f "$out/pipe/model_index.json" ] || "$tool" pipeline "$out/pipe" "$runs/vae-rgb-brightness" \
  "$root/tests/fixtures/text-to-image/sd1/pipe"
for kind in data dark bright; do "$tool" prompts $kind "$out/prompts-$kind.txt"; done

common="--data $out/captions --resolution 32 --batch 32 --caption-dropout 0.1 --latent-cache $runs/t2i-cache"
flawed="--prediction eps --spacing leading"
train_run train "$runs/t2i-base" --model "$out/pipe" $common $flawed --steps $base_steps --lr 5e-4 --warmup 100 \
  --ema-decay 0.999
train_run train "$runs/t2i-unchanged" --model "$runs/t2i-base" $common $flawed --steps $tune_steps --lr 1e-4 \
  --lr-schedule constant --warmup 0 --ema-decay 0.999
train_run train "$runs/t2i-recipe" --model "$runs/t2i-base" $common --prediction v --zero-snr --spacing trailing \
  --steps $tune_steps --lr 1e-4 --lr-schedule constant --warmup 0 --ema-decay 0.999

settings="--sampler ddim --steps 50 --spacing trailing --cfg 7.5 --cfg-rescale 0.7"
g="$settings --batch 250"
for name in unchanged recipe; do
  sample_run "$runs/t2i-$name" "$out/samples-$name" $g --prompts "$out/prompts-data.txt" --n $n
  for kind in dark bright; do
    sample_run "$runs/t2i-$name" "$out/samples-$name-$kind" $g --prompts "$out/prompts-$kind.txt" --n 200
  done
  "$diffuse" analyze brightness --samples "$out/samples-$name" --data fashion-mnist-brightness:test
  # diffuse eval's feature network reads 1-channel images: the (grey) RGB samples' luminance.
  [ -d "$out/samples-$name-grey" ] || "$tool" grey "$out/samples-$name" "$out/samples-$name-grey"
  eval_run "$out/samples-$name-grey" --no-labels --reference fashion-mnist-brightness:test
  for kind in dark bright; do
    "$diffuse" analyze brightness --samples "$out/samples-$name-$kind" --data fashion-mnist-brightness:test > /dev/null
  done
done

# One table: FID-FMNIST and W1 on the data's captions; mean brightness for the dark and bright prompts against the
# data's mean for those captions (caption-stats.csv).
json() { sed -n "s/.*\"$2\": *\([-0-9.e]*\).*/\1/p" "$1/analysis/brightness.json"; }
data_mean() { awk -F, -v k="$1" '$1 == k { print $3 }' "$out/caption-stats.csv"; }
{
  echo "model,fid_fmnist,fid_floor,w1,sample_mean,data_mean,dark_prompt_mean,dark_data_mean,bright_prompt_mean,bright_data_mean"
  for name in unchanged recipe; do
    echo "$name,$(eval_row "$out/samples-$name-grey" FID-FMNIST FID-FMNIST:floor),$(json "$out/samples-$name" w1),$(json "$out/samples-$name" sample_mean),$(json "$out/samples-$name" data_mean),$(json "$out/samples-$name-dark" sample_mean),$(data_mean dark),$(json "$out/samples-$name-bright" sample_mean),$(data_mean bright)"
  done
} | tee "$out/results.csv"
cp "$out/results.csv" "$(dirname "$0")/results.csv"
for name in unchanged recipe; do
  sample_run "$runs/t2i-$name" "$out/grid-$name" $settings --prompts "$out/prompts-dark.txt" --n 20 --grid-cols 10 --batch 20
  cp "$out/grid-$name/grid.png" "$(dirname "$0")/grid-$name-dark.png"
done

#!/usr/bin/env bash
# Experiment 6 (latent diffusion, 001 and 000 documents): pixel-space against latent-space diffusion on
# Fashion-MNIST at matched training compute. The autoencoder (train-vae) maps 32x32x1 images to 4x8x8 latents
# scaled to unit variance; the latent UNet trains for as many seconds as the pixel UNet (its step count is
# set from a timed probe), and both are scored with FID-FMNIST on the same number of samples.
# Usage: experiments/06-latent-diffusion/run.sh [--full]    (reduced: about 40 minutes on 2 cores)
source "$(dirname "$0")/../common.sh"
out=$root/out/experiments/06
mkdir -p "$out"
base=$runs/base   # the pixel model, shared with experiments 4 and 5 (the demo's recipe)
train_run train "$base" --data fashion-mnist $model --steps $steps --schedule linear --zero-snr --prediction v \
  --loss-weight min-snr --label-dropout 0.1

if [ $full = 1 ]; then vae_steps=${VAE_STEPS:-20000}; else vae_steps=${VAE_STEPS:-1500}; fi
train_run train-vae "$runs/vae" --data fashion-mnist --channels 32,64,128 --layers-per-block 1 --latent-channels 4 \
  --steps $vae_steps --batch 32 --lr 1e-3 --warmup 100 --ema-decay 0.999 --kl-weight 1e-6

# The latent UNet: two levels on 8x8x4, no attention. Matched compute: as many training FLOPs as the pixel
# UNet (steps x batch x forward GFLOP per image, as `diffuse train` prints them; the cached encoding costs one
# encoder pass per image on top, reported separately).
latent_model="--channels 64,128 --layers-per-block 1 --attention-levels none --norm-groups 16 --batch 32 --lr 5e-4 --warmup 100 --ema-decay 0.999"
latent=$runs/latent
gflop() { grep -o '[0-9.e+-]* GFLOP per image forward' "$1" | head -1 | cut -d' ' -f1; }
if [ ! -f "$latent/train_state/state.json" ]; then
  train_run train "$latent" --data fashion-mnist --vae "$runs/vae" --latent-cache "$runs/latent-cache" $latent_model \
    --steps 1 --schedule linear --zero-snr --prediction v --loss-weight min-snr --label-dropout 0.1 2>&1 | tee "$out/latent-train.txt"
fi
"$diffuse" train --out "$base" --resume --quiet 2>&1 | tee "$out/pixel-train.txt"
pixel_steps=$(grep -o '"steps": [0-9]*' "$base/run.json" | head -1 | grep -o '[0-9]*$')
latent_steps=$(awk -v n="$pixel_steps" -v p="$(gflop "$out/pixel-train.txt")" -v l="$(gflop "$out/latent-train.txt")" \
  'BEGIN { printf "%d", n * p / l }')
echo "pixel UNet: $pixel_steps steps at $(gflop "$out/pixel-train.txt") GFLOP/image; latent UNet: $latent_steps steps at $(gflop "$out/latent-train.txt") GFLOP/image" | tee "$out/matched-compute.txt"
"$diffuse" train --out "$latent" --resume --steps "$latent_steps" --latent-cache "$runs/latent-cache" --quiet

for name in base latent; do
  sample_run "$runs/$name" "$out/samples-$name" --sampler dpmpp_2m --steps 25 --n $samples --batch 250 --cfg 2 --cfg-rescale 0.7
done
for name in base latent; do eval_run "$out/samples-$name"; done

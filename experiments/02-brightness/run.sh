#!/usr/bin/env bash
# Experiment 2 (Lin et al. 2023, 003 document): can a model reproduce very dark and very bright images?
# Data: Fashion-MNIST whose per-image brightness level is spread over about (-1, 1)
# (fashion-mnist-brightness). Class-conditional models, same network and budget:
#   flawed: Stable Diffusion's scaled_linear schedule (terminal SNR 0.0047), eps prediction, leading spacing
#   offset: the flawed recipe plus offset noise 0.1 (the baseline Lin et al. compare against)
#   fixed:  scaled_linear rescaled to zero terminal SNR, v prediction with the plain v loss (Lin et al. 3.2),
#           trailing spacing, CFG rescale 0.7 (and the same samples without rescale, to separate its effect)
#   fixed-minsnr: the fixed recipe with min-SNR weights instead of the v loss; for v prediction the min-SNR
#           weight min(SNR, 5) / (SNR + 1) is 0 at SNR 0, so the steps that set the brightness get no weight
# Each samples the same number of images with DDIM 25 steps and CFG 3; `diffuse analyze brightness` compares
# the per-image mean brightness of samples and data (W1, darkest/brightest decile shares, histograms), and
# `diffuse eval --reference` the samples with the same brightness-spread test split.
# Usage: experiments/02-brightness/run.sh [--full]    (reduced: about 50 minutes on 2 cores)
source "$(dirname "$0")/../common.sh"
out=$root/out/experiments/02
mkdir -p "$out"
data="--data fashion-mnist-brightness --schedule scaled_linear --label-dropout 0.1"
fixed="--zero-snr --prediction v --spacing trailing"
train_run train "$runs/bright-flawed" $data $model --steps $steps --prediction eps --spacing leading
train_run train "$runs/bright-offset" $data $model --steps $steps --prediction eps --spacing leading --offset-noise 0.1
train_run train "$runs/bright-fixed" $data $model --steps $steps $fixed --loss-weight uniform
train_run train "$runs/bright-fixed-minsnr" $data $model --steps $steps $fixed --loss-weight min-snr
g="--sampler ddim --steps 25 --n $samples --batch 250 --cfg 3"
sample_run "$runs/bright-flawed" "$out/samples-flawed" $g
sample_run "$runs/bright-offset" "$out/samples-offset" $g
sample_run "$runs/bright-fixed" "$out/samples-fixed" $g --cfg-rescale 0.7
sample_run "$runs/bright-fixed" "$out/samples-fixed-norescale" $g
sample_run "$runs/bright-fixed-minsnr" "$out/samples-fixed-minsnr" $g --cfg-rescale 0.7
names="flawed offset fixed fixed-norescale fixed-minsnr"
for name in $names; do
  "$diffuse" analyze brightness --samples "$out/samples-$name" --data fashion-mnist-brightness:test
  eval_run "$out/samples-$name" --reference fashion-mnist-brightness:test   # FID against the data it learned
done

small="--sampler ddim --steps 25 --batch 40 --cfg 3"
figure_grid "$runs/bright-flawed" flawed $small
figure_grid "$runs/bright-offset" offset $small
figure_grid "$runs/bright-fixed" fixed $small --cfg-rescale 0.7
figure_grid "$runs/bright-fixed" fixed-norescale $small

# One table and one figure: W1 and extreme-decile shares per model (brightness.json), FID-FMNIST beside, and the
# three sample histograms over the data's (all runs bin the same [-1, 1] range).
json() { sed -n "s/.*\"$2\": *\([-0-9.e]*\).*/\1/p" "$out/samples-$1/analysis/brightness.json"; }
{
  echo "model,w1,share_below_data_p10,share_above_data_p90,sample_mean,data_mean,sample_std,data_std,fid_fmnist,fid_floor,class_accuracy"
  for name in $names; do
    echo "$name,$(json $name w1),$(json $name share_below_data_p10),$(json $name share_above_data_p90),$(json $name sample_mean),$(json $name data_mean),$(json $name sample_std),$(json $name data_std),$(eval_row "$out/samples-$name" FID-FMNIST FID-FMNIST:floor class_accuracy)"
  done
} > "$out/brightness.csv"
gnuplot <<GP
set datafile separator ","
set terminal pngcairo size 900,560 noenhanced
set output "$out/brightness.png"
set xlabel "per-image mean brightness"
set ylabel "density"
set key below
set title "brightness of samples against the data (fashion-mnist-brightness, test split)"
plot "$out/samples-flawed/analysis/brightness.csv" using (\$1+\$2)/2:3 with filledcurves y1=0 fs transparent solid 0.25 lc rgb "gray40" title "data", \\
     "$out/samples-flawed/analysis/brightness.csv" using (\$1+\$2)/2:4 with lines lw 2 title "flawed (SD schedule, eps, leading)", \\
     "$out/samples-offset/analysis/brightness.csv" using (\$1+\$2)/2:4 with lines lw 2 title "offset noise 0.1", \\
     "$out/samples-fixed/analysis/brightness.csv" using (\$1+\$2)/2:4 with lines lw 2 title "fixed (zero SNR, v loss, trailing, rescale)", \\
     "$out/samples-fixed-norescale/analysis/brightness.csv" using (\$1+\$2)/2:4 with lines lw 2 lc rgb "dark-red" title "fixed, CFG without rescale", \\
     "$out/samples-fixed-minsnr/analysis/brightness.csv" using (\$1+\$2)/2:4 with lines lw 1 dt 2 title "fixed with min-SNR weights"
GP
echo "wrote $out/brightness.csv and $out/brightness.png"

# The figures and tables RESULTS.md shows, beside it.
cp "$out/brightness.png" "$out/brightness.csv" "$(dirname "$0")/"

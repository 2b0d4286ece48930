#!/usr/bin/env bash
# Experiment 2 (Lin et al. 2023, 003 document): can a model reproduce very dark and very bright images?
# Data: Fashion-MNIST whose per-image brightness level is spread over about (-1, 1)
# (fashion-mnist-brightness). Three class-conditional models, same network and budget:
#   flawed: Stable Diffusion's scaled_linear schedule (terminal SNR 0.0047), eps prediction, leading spacing
#   offset: the flawed recipe plus offset noise 0.1 (the baseline Lin et al. compare against)
#   fixed:  scaled_linear rescaled to zero terminal SNR, v prediction, trailing spacing, CFG rescale 0.7
# Each samples the same number of images with DDIM 25 steps and CFG 3; `diffuse analyze brightness` compares
# the per-image mean brightness of samples and data (W1, darkest/brightest decile shares, histograms).
# Usage: experiments/02-brightness/run.sh [--full]    (reduced: about 45 minutes on 2 cores)
source "$(dirname "$0")/../common.sh"
out=$root/out/experiments/02
mkdir -p "$out"
data="--data fashion-mnist-brightness --schedule scaled_linear --label-dropout 0.1"
train_run train "$runs/bright-flawed" $data $model --steps $steps --prediction eps --spacing leading
train_run train "$runs/bright-offset" $data $model --steps $steps --prediction eps --spacing leading --offset-noise 0.1
train_run train "$runs/bright-fixed" $data $model --steps $steps --zero-snr --prediction v --loss-weight min-snr --spacing trailing
sample_run "$runs/bright-flawed" "$out/samples-flawed" --sampler ddim --steps 25 --n $samples --batch 250 --cfg 3
sample_run "$runs/bright-offset" "$out/samples-offset" --sampler ddim --steps 25 --n $samples --batch 250 --cfg 3
sample_run "$runs/bright-fixed" "$out/samples-fixed" --sampler ddim --steps 25 --n $samples --batch 250 --cfg 3 --cfg-rescale 0.7
for name in flawed offset fixed; do
  "$diffuse" analyze brightness --samples "$out/samples-$name" --data fashion-mnist-brightness:test
  eval_run "$out/samples-$name"
done

#!/usr/bin/env bash
# Experiment 5 (001 and 003 documents): guidance and samplers on the base Fashion-MNIST model.
#  - guidance: none, classifier guidance (a noisy classifier, scales 1 and 3), classifier-free guidance
#    w = 1.5, 3, 5 with and without rescale 0.7: class accuracy and FID-FMNIST against the scale;
#  - samplers: DDPM with all 1000 steps against DDIM and DPM-Solver++ 2M at 10, 25 and 50 steps.
# Usage: experiments/05-guidance-samplers/run.sh [--full]    (reduced: about 60 minutes on 2 cores)
source "$(dirname "$0")/../common.sh"
out=$root/out/experiments/05
mkdir -p "$out"
recipe="--data fashion-mnist --schedule linear --zero-snr"
train_run train "$runs/base" $recipe --prediction v --loss-weight min-snr --label-dropout 0.1 $model --steps $steps
train_run train-classifier "$runs/classifier" $recipe --channels 32,64,64 --attention-levels none --norm-groups 16 \
  --batch 64 --steps $((steps * 2)) --lr 1e-3

g="--sampler ddim --steps 25 --n $samples --batch 250"
sample_run "$runs/base" "$out/none" $g
for scale in 1 3; do
  sample_run "$runs/base" "$out/classifier-$scale" $g --classifier "$runs/classifier" --classifier-scale $scale
done
for w in 1.5 3 5; do
  sample_run "$runs/base" "$out/cfg-$w" $g --cfg $w
  sample_run "$runs/base" "$out/cfg-$w-rescale" $g --cfg $w --cfg-rescale 0.7
done

ddpm_n=$((samples / 4))
sample_run "$runs/base" "$out/ddpm-1000" --sampler ddpm --steps 1000 --n $ddpm_n --batch 250
for sampler in ddim dpmpp_2m; do
  for s in 10 25 50; do
    sample_run "$runs/base" "$out/$sampler-$s" --sampler $sampler --steps $s --n $samples --batch 250
  done
done
for dir in "$out"/*/; do eval_run "${dir%/}"; done

#!/usr/bin/env bash
# Experiment 4 (002 document, E-TSDM): the network's Lipschitz constant in t near t = 0, with and without
# timestep-condition sharing (t~ = 100, n = 5), and FID-FMNIST with DDIM and DPM-Solver++ at 10 and 25 steps.
# Both models use the demo's recipe (zero terminal SNR, v, min-SNR weights) on Fashion-MNIST.
# Usage: experiments/04-etsdm/run.sh [--full]    (reduced: about 40 minutes on 2 cores)
source "$(dirname "$0")/../common.sh"
out=$root/out/experiments/04
mkdir -p "$out"
recipe="--data fashion-mnist --schedule linear --zero-snr --prediction v --loss-weight min-snr --label-dropout 0.1"
train_run train "$runs/base" $recipe $model --steps $steps
train_run train "$runs/etsdm" $recipe $model --steps $steps --etsdm-t-tilde 100 --etsdm-n 5
for name in base etsdm; do
  for sampler in ddim dpmpp_2m; do
    for s in 10 25; do
      sample_run "$runs/$name" "$out/samples-$name-$sampler-$s" --sampler $sampler --steps $s --n $samples --batch 250
    done
  done
done
for name in base etsdm; do
  "$diffuse" analyze lipschitz --model "$runs/$name" --out "$out/lipschitz-$name"
  for sampler in ddim dpmpp_2m; do
    for s in 10 25; do eval_run "$out/samples-$name-$sampler-$s"; done
  done
done

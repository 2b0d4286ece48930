#!/usr/bin/env bash
# Experiment 3 (000 document): eps and v losses. For the same x0 error, L_v / L_eps = (SNR + 1) / SNR.
# Three models on Fashion-MNIST with the linear schedule (terminal SNR 4e-5: eps prediction stays defined):
#   eps:       eps prediction, uniform weight (plain eps MSE)
#   v:         v prediction, uniform weight (plain v MSE = eps MSE weighted by (SNR+1)/SNR)
#   v-epsw:    v prediction weighted back to eps-equivalence (--loss-weight eps), which should train like `eps`
# `diffuse analyze loss` measures each model's loss per timestep in every target.
# Usage: experiments/03-eps-vs-v/run.sh [--full]    (reduced: about 45 minutes on 2 cores)
source "$(dirname "$0")/../common.sh"
out=$root/out/experiments/03
mkdir -p "$out"
data="--data fashion-mnist --schedule linear --label-dropout 0.1"
train_run train "$runs/eps" $data $model --steps $steps --prediction eps --loss-weight uniform
train_run train "$runs/v" $data $model --steps $steps --prediction v --loss-weight uniform
train_run train "$runs/v-epsw" $data $model --steps $steps --prediction v --loss-weight eps
for name in eps v v-epsw; do
  "$diffuse" analyze loss --model "$runs/$name" --out "$out/loss-$name"
  sample_run "$runs/$name" "$out/samples-$name" --sampler ddim --steps 25 --spacing linspace --n $samples --batch 250
  eval_run "$out/samples-$name"
done

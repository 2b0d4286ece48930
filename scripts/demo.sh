#!/usr/bin/env bash
# The main job: set up and build, reproduce Lin et al.'s tables, train a small class-conditional model
# on Fashion-MNIST with the fixes of Lin et al. (zero terminal SNR, v prediction, trailing spacing),
# and end with a grid of samples with classifier-free guidance and rescale.
# Usage: scripts/demo.sh [OUT] (default out/demo; DEMO_STEPS=N to change the training length).
# Reruns reuse OUT/run (delete it to retrain).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh build
out=${1:-out/demo}
steps=${DEMO_STEPS:-1200}
mkdir -p "$out"
build/diffuse schedule --table
build/diffuse schedule --schedule linear,scaled_linear,cosine --zero-snr --plot "$out/schedules.png" \
  --csv "$out/schedules.csv"

if [ -d "$out/run" ]; then
  echo "demo: reusing $out/run (delete it to retrain; continue a stopped run with: build/diffuse train --out $out/run --resume)"
else
  build/diffuse train --data fashion-mnist --out "$out/run" --steps "$steps" --batch 32 \
    --channels 32,64,64 --layers-per-block 1 --attention-levels none --norm-groups 16 \
    --schedule linear --zero-snr --prediction v --loss-weight min-snr --label-dropout 0.1 \
    --lr 5e-4 --warmup 100 --ema-decay 0.999 --checkpoint-every 500 --log-every 50
fi
build/diffuse sample --model "$out/run" --sampler ddim --steps 25 --spacing trailing --n 40 --grid-cols 10 \
  --cfg 3 --cfg-rescale 0.7 --seed 0 --out "$out/samples"
echo "demo: schedules in $out/schedules.png, loss curve in $out/run/loss.png, samples in $out/samples/grid.png"

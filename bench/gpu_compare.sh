#!/usr/bin/env bash
# diffuse beside diffusers on a GPU machine prepared with ../shared/device-kit (.devkit/ carried along), from
# the repository root; results under $OUT (default /tmp/gpu-compare).
#   bench:   build, diffusers_gpu_bench.py, bench/gpu_bench (device checks, forward, steps, trainer, sampling)
#   quality: the experiments/05 recipe trained for SECS seconds (steps from the trainer rate just measured),
#            then FID-FMNIST of 1000 DDIM-25 samples without and with CFG 3
#   all:     both, in one run (docs/cuda.md has the figures of 2026-11-27)
# usage: bench/gpu_compare.sh [bench|quality|all]   (FIGS=FILE reuses diffusers' figures; SECS, RATE, GRAPHS)
set -uo pipefail
phase=${1:-bench}
OUT=${OUT:-/tmp/gpu-compare}
mkdir -p "$OUT"
B=/tmp/build-gpu
t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
bash .devkit/on-device.sh diffuse_cli gpu_bench || exit 1
el built
if [ "$phase" = bench ] || [ "$phase" = all ]; then
  if [ -n "${FIGS:-}" ]; then cp "$FIGS" $OUT/diffusers.json; else
    PYTHONPATH=.devkit python3 .devkit/diffusers_gpu_bench.py 0 $OUT/diffusers.json 2>&1 | grep -v -i warn; fi
  el diffusers done
  nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader -lms 250 > $OUT/util-bench.txt &
  smi=$!
  $B/bench/gpu_bench --diffusers-figures $OUT/diffusers.json --json $OUT/diffuse.json --trainer-steps ${TSTEPS:-200}
  kill $smi
  el gpu_bench done
fi
if [ "$phase" = quality ] || [ "$phase" = all ]; then
  secs=${SECS:-270}
  rate=${RATE:-$(python3 -c "
import json; r = json.load(open('$OUT/diffuse.json')); k = 'trainer (diffuse::train) bf16 batch 128 %s images/s'
print(int(r.get(k % 'graph', r.get(k % 'eager', 2200))))" 2>/dev/null || echo 2200)}
  steps=$(( rate * secs / 128 ))
  graphs=$(python3 -c "import json; print('true' if 'trainer (diffuse::train) bf16 batch 128 graph images/s' in json.load(open('$OUT/diffuse.json')) else 'false')" 2>/dev/null || echo false)
  el "training $steps steps (rate $rate img/s assumed)"
  nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader -lms 500 > $OUT/util-train.txt &
  smi=$!
  $B/diffuse train --out /tmp/q --overwrite --cuda-graphs ${GRAPHS:-$graphs} --data fashion-mnist --device cuda --bf16 --batch 128 \
    --prediction v --loss-weight min-snr --label-dropout 0.1 --schedule linear --zero-snr --hflip \
    --lr 2e-4 --warmup 500 --ema-decay 0.9999 --steps $steps --checkpoint-every 100000 --log-every 500 2>&1 |
    tr '\r' '\n' | grep -E "step .*(000|500)/|error|stopped" | tail -12
  kill $smi
  el trained
  cp /tmp/q/log.csv $OUT/train-log.csv; cp /tmp/q/loss.png $OUT/ 2>/dev/null
  for cfg in 1 3; do
    $B/diffuse sample --model /tmp/q --out /tmp/s-cfg$cfg --device cuda --sampler ddim --steps 25 --n 1000 \
      --batch 500 --cfg $cfg --quiet 2>&1 | tail -2
    $B/diffuse eval --samples /tmp/s-cfg$cfg 2>&1 | tail -4
    cp /tmp/s-cfg$cfg/eval.json $OUT/eval-cfg$cfg.json
    el sampled cfg $cfg
  done
  cp /tmp/s-cfg3/grid.png $OUT/grid-cfg3.png
fi

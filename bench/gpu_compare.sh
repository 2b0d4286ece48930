#!/usr/bin/env bash
# diffuse beside diffusers on a GPU machine prepared with ../shared/device-kit (.devkit/ carried along), from
# the repository root; results under $OUT (default /tmp/gpu-compare).
#   bench:   build, diffusers_gpu_bench.py, bench/gpu_bench (device checks, forward, steps, trainer, sampling)
#   quality: the experiments/05 recipe trained for SECS seconds (default 300; steps from the fastest bf16 trainer
#            rate just measured, with its graphs and layout), then FID-FMNIST of 1000 DDIM-25 samples without
#            guidance, with CFG 1.5 and 3, and with bf16 weights
#   sd:      the Stable Diffusion 1.5-shaped UNet (random weights), fp16 and bf16, batch 2 at 64x64 and 8 at 96x96:
#            diffuse's forward eager and as a CUDA graph (bench/sd_unet_bench) beside diffusers' eager forward with
#            SDPA (bench/diffusers_sd_gpu.py), then a 30-step 512x512 text-to-image run of a random-weight pipeline
#            folder: `diffuse sample` with and without --cuda-graphs beside diffusers' pipeline loop (about 4 minutes)
#   all:     bench and quality, in one run (docs/cuda.md has the figures of 2026-11-27 and 2026-12-04)
# usage: bench/gpu_compare.sh [bench|quality|sd|all]   (FIGS=FILE reuses diffusers' figures; SECS, RATE, GRAPHS)
# A device call may run 600 s: on a fresh machine run `bench` (about 5 minutes) and then, on the same warm
# machine, `quality` (about 7); the second reads the first's figures from /tmp/gpu-compare-diffuse.json.
set -uo pipefail
phase=${1:-bench}
OUT=${OUT:-/tmp/gpu-compare}
mkdir -p "$OUT"
B=/tmp/build-gpu
t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
source bench/gpu_icu.sh  # the CLIP tokenizer's ICU, carried in .devkit/icu (bench/gpu_icu.sh pack)
[ -f /tmp/build-gpu/build.ninja ] || rm -rf /tmp/build-gpu
if [ "$phase" = sd ] || [ "$phase" = t2i ]; then
  bash .devkit/on-device.sh diffuse_cli sd_unet_bench || exit 1
else
  bash .devkit/on-device.sh diffuse_cli gpu_bench || exit 1
fi
el built
if [ "$phase" = bench ] || [ "$phase" = all ]; then
  if [ -n "${FIGS:-}" ]; then cp "$FIGS" $OUT/diffusers.json; else
    PYTHONPATH=.devkit python3 .devkit/diffusers_gpu_bench.py 0 $OUT/diffusers.json 2>&1 | grep -v -i warn; fi
  el diffusers done
  nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader -lms 250 > $OUT/util-bench.txt &
  smi=$!
  $B/bench/gpu_bench --diffusers-figures $OUT/diffusers.json --json $OUT/diffuse.json --trainer-steps ${TSTEPS:-200}
  kill $smi
  cp $OUT/diffuse.json /tmp/gpu-compare-diffuse.json
  el gpu_bench done
fi
if [ "$phase" = quality ] || [ "$phase" = all ]; then
  secs=${SECS:-300}
  # The fastest bf16 trainer variant gpu_bench measured: graph and NHWC or not (eager when graphs failed).
  read -r rate graphs nhwc < <(python3 -c "
import json
import os
f = '$OUT/diffuse.json'
r = json.load(open(f if os.path.exists(f) else '/tmp/gpu-compare-diffuse.json'))
k = 'trainer (diffuse::train) bf16 batch 128 %s images/s'
best = max([(r[k % v], v) for v in ('graph NHWC', 'graph', 'eager') if k % v in r] or [(2200, 'eager')])
print(int(best[0]), 'true' if 'graph' in best[1] else 'false', 'NHWC' in best[1])" 2>/dev/null || echo "2200 false False")
  rate=${RATE:-$rate}
  steps=$(( rate * secs / 128 ))
  cl=""; [ "$nhwc" = True ] && cl="--channels-last"
  el "training $steps steps (rate $rate img/s assumed; graphs $graphs; ${cl:-NCHW})"
  nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader -lms 500 > $OUT/util-train.txt &
  smi=$!
  $B/diffuse train --out /tmp/q --overwrite --cuda-graphs ${GRAPHS:-$graphs} $cl --data fashion-mnist --device cuda --bf16 \
    --batch 128 --prediction v --loss-weight min-snr --label-dropout 0.1 --schedule linear --zero-snr --hflip \
    --lr 2e-4 --warmup 500 --ema-decay 0.9999 --steps $steps --checkpoint-every 100000 --log-every 500 2>&1 |
    tr '\r' '\n' | grep -E "step .*(000|500)/|error|stopped" | tail -12
  kill $smi
  el trained
  cp /tmp/q/log.csv $OUT/train-log.csv; cp /tmp/q/loss.png $OUT/ 2>/dev/null
  # FID-FMNIST of 1000 DDIM-25 samples: without guidance and with CFG 1.5 and 3 (fp32), and bf16 weights.
  for v in "1 fp32" "1.5 fp32" "3 fp32" "1 bf16"; do
    set -- $v
    name=cfg$1-$2
    $B/diffuse sample --model /tmp/q --out /tmp/s-$name --device cuda --sampler ddim --steps 25 --n 1000 \
      --batch 500 --cfg $1 --dtype $2 --quiet 2>&1 | tail -2
    $B/diffuse eval --samples /tmp/s-$name 2>&1 | tail -4
    { printf '%s ' $name; tr -d '\n' < /tmp/s-$name/eval.json; echo; } >> $OUT/evals.txt  # one file: few come back
    el sampled $name
  done
  cp /tmp/s-cfg1.5-fp32/grid.png $OUT/grid-cfg1.5.png
fi
# sd and t2i: each line goes to $OUT/sd.txt as it comes, so a run stopped at its limit still brings back what it measured.
log() { tee -a $OUT/sd.txt; }
if [ "$phase" = sd ]; then
  for dt in fp16 bf16; do
    for shape in "2 64" "8 96"; do
      set -- $shape
      timeout 120 $B/bench/sd_unet_bench --device cuda --dtype $dt --batch $1 --size $2 --iters 20 --cuda-graphs 1 2>&1 |
        grep -E "sd_unet_bench|forward|error" | sed "s/^/diffuse $dt: /" | log
    done
    timeout 120 env PYTHONPATH=.devkit python3 bench/diffusers_sd_gpu.py unet $dt 2x64 8x96 2>&1 | grep -E "^diffusers|Error" | log
  done
  el unet done
fi
if [ "$phase" = sd ] || [ "$phase" = t2i ]; then  # t2i: the text-to-image runs alone
  [ -f /tmp/sd15/model_index.json ] || $B/bench/sd_unet_bench --write-pipeline /tmp/sd15 --like tests/fixtures/text-to-image/sd1/pipe | log
  # diffuse's seconds of 5 images less those of 1 (batch 1 each, loaded once per run): 4 warm text-to-image runs.
  for graphs in "" "--cuda-graphs"; do
    for n in 1 5; do
      timeout 120 $B/diffuse sample --model /tmp/sd15 --device cuda --dtype fp16 --steps 30 --cfg 7.5 --n $n --batch 1 \
        --prompt "a photo of an astronaut riding a horse on mars" --out /tmp/t2i-$n $graphs --quiet 2>&1 |
        grep -E "sampled|error" | sed "s/^/diffuse fp16 ${graphs:-eager}: /" | log
    done
  done
  timeout 150 env PYTHONPATH=.devkit python3 bench/diffusers_sd_gpu.py pipe fp16 30 2>&1 | grep -E "^diffusers|Error" | log
  cp /tmp/t2i-5/grid.png $OUT/sd-grid.png 2>/dev/null
  el sd done
fi

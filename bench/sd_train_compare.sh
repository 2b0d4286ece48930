#!/usr/bin/env bash
# diffuse beside diffusers on this CPU, in one run: a training step of the SD 1.5-shaped UNet2DConditionModel
# (random weights, batch 1 at 64x64 latents, text states [1, 77, 768]: forward, MSE, backward, AdamW), float32, with
# and without gradient checkpointing, best and mean seconds and peak RSS of each (one process per figure, so each
# peak is its own). diffusers runs from the device kit's sources on Debian 13's python3-torch 2.6 in the LibTorch 2.x
# lane's root, prepared as bench/sd_compare.sh prepares it (run that once first).
# usage: bench/sd_train_compare.sh [ITERS=2]        (as root or with sudo; builds build/ first)
set -euo pipefail
cd "$(dirname "$0")/.."
iters=${1:-2}
root=${DIFFUSE_TRIXIE_ROOT:-${HOME:-/root}/.cache/diffuse/trixie-root}
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
[ -d "$root/opt/sdsrc/transformers" ] || { echo "error: no diffusers sources in $root (run bench/sd_compare.sh once)" >&2; exit 1; }
in_root() { $sudo chroot "$root" /usr/bin/env -i HOME=/root PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
            PYTHONPATH=/opt/sdsrc THREADS=2 "$@"; }
mountpoint -q "$root/proc" || $sudo mount --bind /proc "$root/proc"
$sudo rm -rf "$root/opt/sdbench" && $sudo mkdir -p "$root/opt/sdbench/tests/fixtures"
$sudo cp -r bench "$root/opt/sdbench/" && $sudo cp -r tests/fixtures/generators "$root/opt/sdbench/tests/fixtures/"
cmake --build build -j2 --target sd_unet_bench > /dev/null
echo "== $(date -u +%F) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), 2 threads each"
for ckpt in 0 1; do
  build/bench/sd_unet_bench --train 1 --batch 1 --iters "$iters" --gradient-checkpointing "$ckpt" | tail -1 |
    sed "s/^/diffuse (checkpointing $ckpt): /"
  in_root python3 /opt/sdbench/bench/diffusers_sd_bench.py train "$iters" "$ckpt"
done

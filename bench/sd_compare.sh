#!/usr/bin/env bash
# diffuse beside diffusers on this CPU, in one run, alternated: the SD 1.5-shaped UNet's step (batch 2 at 64x64,
# float32; diffusers' bf16 autocast and diffuse's --conv-dtype bf16 too) and a whole txt2img of a random-weight
# SD 1.5-shaped pipeline folder that diffusers writes and both load. diffusers runs from the device kit's sources on
# Debian 13's python3-torch 2.6 in the LibTorch 2.x lane's root (scripts/test-libtorch2.sh makes it).
# usage: bench/sd_compare.sh [ROUNDS=2] [PIPE_STEPS=4]        (as root or with sudo; builds build/ first)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}; steps=${2:-4}
root=${DIFFUSE_TRIXIE_ROOT:-${HOME:-/root}/.cache/diffuse/trixie-root}
kit=${DIFFUSE_DEVICE_KIT:-../shared/device-kit}
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
[ -d "$root/usr" ] || { echo "error: no Debian 13 root at $root (run scripts/test-libtorch2.sh once)" >&2; exit 1; }
in_root() { $sudo chroot "$root" /usr/bin/env -i HOME=/root PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
            PYTHONPATH=/opt/sdsrc THREADS=2 "$@"; }
mountpoint -q "$root/proc" || $sudo mount --bind /proc "$root/proc"
if [ ! -d "$root/opt/sdsrc/transformers" ]; then
  in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-torch python3-numpy \
    python3-regex python3-requests python3-tqdm python3-packaging python3-filelock python3-yaml python3-pil \
    python3-importlib-metadata python3-safetensors python3-httpx > /dev/null
  $sudo mkdir -p "$root/opt/sdsrc"
  $sudo tar -xJf "$kit/diffusers-full-src.tar.xz" -C "$root/opt/sdsrc"
  $sudo tar -xJf "$kit/transformers-src.tar.xz" -C "$root/opt/sdsrc"
fi
$sudo rm -rf "$root/opt/sdbench" && $sudo mkdir -p "$root/opt/sdbench"
$sudo cp -r bench tests/fixtures/generators "$root/opt/sdbench/" && $sudo mkdir -p "$root/opt/sdbench/tests/fixtures"
$sudo mv "$root/opt/sdbench/generators" "$root/opt/sdbench/tests/fixtures/"
$sudo cp -r tests/fixtures/text-to-image/sd1/pipe/tokenizer "$root/opt/sdbench/tokenizer"
cmake --build build -j2 --target diffuse_cli sd_unet_bench > /dev/null
echo "== $(date -u +%F) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), 2 threads each"
for r in $(seq "$rounds"); do
  echo "-- round $r"
  build/bench/sd_unet_bench --iters 2 | tail -1 | sed 's/^/diffuse fp32: /'
  in_root python3 /opt/sdbench/bench/diffusers_sd_bench.py unet fp32 2
  build/bench/sd_unet_bench --iters 2 --conv-dtype bf16 | tail -1 | sed 's/^/diffuse conv bf16: /'
  [ "$r" -gt 1 ] || in_root python3 /opt/sdbench/bench/diffusers_sd_bench.py unet bf16 1
done
[ "$steps" -gt 0 ] || exit 0
in_root python3 /opt/sdbench/bench/diffusers_sd_bench.py make /opt/sdbench/pipe /opt/sdbench/tokenizer > /dev/null
in_root python3 /opt/sdbench/bench/diffusers_sd_bench.py pipe /opt/sdbench/pipe "$steps"
start=$(date +%s.%N)
DIFFUSE_SKIP_BLAS_CHECK=1 build/diffuse sample --model "$root/opt/sdbench/pipe" --prompt \
  "a photo of an astronaut riding a horse on mars" --cfg 7.5 --steps "$steps" --n 1 --height 512 --width 512 \
  --out /tmp/sd_compare --quiet | sed 's/^/diffuse: /'
echo "diffuse txt2img $steps steps: $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s (with loading)"

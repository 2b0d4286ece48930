#!/usr/bin/env bash
# ICU for a GPU run: the lent GPU machine has no libicu-dev, and the device kit (../shared/device-kit) carries none.
#   here, after ../shared/device-kit/prepare.sh:   bench/gpu_icu.sh pack     (Debian 12's ICU 72 into .devkit/icu,
#                                                                            about 11 MB: the headers and the shared
#                                                                            libraries, no static ones)
#   there, before .devkit/on-device.sh:            source bench/gpu_icu.sh   (unpacks it to /opt/icu, sets ICU_ROOT)
# A run takes along at most 64 MiB: with the tracked files, the kit then fits without its Fashion-MNIST training
# images (gpu_bench falls back to synthetic shapes of the same size; the `quality` phase needs them).
if [ "${1:-}" = pack ]; then
  set -euo pipefail
  rm -rf .devkit/icu /tmp/gpu-icu && mkdir -p .devkit/icu /tmp/gpu-icu/root
  (cd /tmp/gpu-icu && apt-get download -q libicu-dev libicu72 2>/dev/null)
  for f in /tmp/gpu-icu/*.deb; do dpkg -x "$f" /tmp/gpu-icu/root; done
  find /tmp/gpu-icu/root -name '*.a' -delete
  tar -C /tmp/gpu-icu/root -cJf .devkit/icu/icu72.tar.xz usr/include/unicode usr/lib/x86_64-linux-gnu
  echo "packed: $(du -sh .devkit/icu | cut -f1) in .devkit/icu"
  exit 0
fi
if [ -f .devkit/icu/icu72.tar.xz ]; then
  [ -d /opt/icu/usr/include/unicode ] || { mkdir -p /opt/icu && tar -xJf .devkit/icu/icu72.tar.xz -C /opt/icu; }
  export ICU_ROOT=/opt/icu/usr CMAKE_LIBRARY_PATH=/opt/icu/usr/lib/x86_64-linux-gnu \
    LD_LIBRARY_PATH=/opt/icu/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi

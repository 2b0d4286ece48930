#!/usr/bin/env bash
# Installs what diffuse needs (Debian 12 packages), configures CMake and builds with -j2.
# Usage: scripts/setup.sh [build-dir]   (default: build). Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}

packages=(build-essential cmake libtorch-dev libopenblas0-pthread dataset-fashion-mnist
          libcli11-dev nlohmann-json3-dev libstb-dev libgtest-dev libbenchmark-dev
          gnuplot-nox zlib1g-dev libgloo-dev libicu-dev)
scripts/install-packages.sh "${packages[@]}"

if [ ! -f "$build/CMakeCache.txt" ]; then
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release
fi
cmake --build "$build" -j2

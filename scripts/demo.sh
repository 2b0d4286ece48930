#!/usr/bin/env bash
# The main job: set up, build, and show what diffuse does.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh build
out=${1:-out/demo}
mkdir -p "$out"
build/diffuse schedule --table
build/diffuse schedule --schedule linear,scaled_linear,cosine --zero-snr --plot "$out/schedules.png" \
  --csv "$out/schedules.csv"
build/diffuse schedule --audit tests/fixtures/scheduler/sd21_scheduler_config.json || true
echo "demo: wrote $out/schedules.png and $out/schedules.csv"

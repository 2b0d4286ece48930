#!/usr/bin/env bash
# Experiment 1: Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"),
# Table 1 (terminal SNR of common schedules) and Table 2 (sample steps of each spacing), plus the
# schedules' log-SNR plot before and after zero-terminal-SNR rescaling.
# Usage: experiments/01-lin-tables/run.sh [OUT] (default out/experiments/01). Seconds; no --full needed.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-out/experiments/01}
mkdir -p "$out"
diffuse=${DIFFUSE:-build/diffuse}
$diffuse schedule --table | tee "$out/tables.txt"
$diffuse schedule --schedule linear,scaled_linear,cosine --plot "$out/schedules.png" --csv "$out/schedules.csv"
$diffuse schedule --schedule linear,scaled_linear,cosine --zero-snr --plot "$out/schedules-zero-snr.png" \
  --csv "$out/schedules-zero-snr.csv"
for spacing in leading linspace trailing; do
  $diffuse schedule --schedule linear --steps 10 --spacing $spacing | tee -a "$out/spacing.txt"
done
echo "experiment 1: tables in $out/tables.txt, plots in $out/schedules*.png"

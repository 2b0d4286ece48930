#!/usr/bin/env bash
# Experiment 5 (001 and 003 documents): guidance and samplers on the base Fashion-MNIST model.
#  - guidance: none, classifier guidance (a noisy classifier, scales 1 and 3), classifier-free guidance
#    w = 1.5, 3, 5 with and without rescale 0.7: class accuracy and FID-FMNIST against the scale;
#  - samplers: DDPM with all 1000 steps against DDIM and DPM-Solver++ 2M at 10, 25 and 50 steps.
# Usage: experiments/05-guidance-samplers/run.sh [--full]    (reduced: about 55 minutes on 2 idle cores, with experiment 4's base model trained)
source "$(dirname "$0")/../common.sh"
out=$root/out/experiments/05
mkdir -p "$out"
recipe="--data fashion-mnist --schedule linear --zero-snr"
train_run train "$runs/base" $recipe --prediction v --loss-weight min-snr --label-dropout 0.1 $model --steps $steps
train_run train-classifier "$runs/classifier" $recipe --channels 32,64,64 --attention-levels none --norm-groups 16 \
  --batch 64 --steps $((steps * 2)) --lr 1e-3

g="--sampler ddim --steps 25 --n $samples --batch 250"
sample_run "$runs/base" "$out/none" $g
for scale in 1 3; do
  sample_run "$runs/base" "$out/classifier-$scale" $g --classifier "$runs/classifier" --classifier-scale $scale
done
for w in 1.5 3 5; do
  sample_run "$runs/base" "$out/cfg-$w" $g --cfg $w
  sample_run "$runs/base" "$out/cfg-$w-rescale" $g --cfg $w --cfg-rescale 0.7
done

# The sampler comparison uses fewer images (DDPM's 1000 steps dominate the time) but the same count for every
# sampler, since FID-FMNIST is biased by the sample count; 256 is the least `diffuse eval` accepts.
n_samplers=$(( samples / 4 > 256 ? samples / 4 : 256 ))
sample_run "$runs/base" "$out/ddpm-1000" --sampler ddpm --steps 1000 --n $n_samplers --batch 256
for sampler in ddim dpmpp_2m; do
  for s in 10 25 50; do
    sample_run "$runs/base" "$out/$sampler-$s" --sampler $sampler --steps $s --n $n_samplers --batch 256
  done
done
for dir in "$out"/*/; do
  case $(basename "$dir") in grid-* | series) continue ;; esac  # small figure grids and plot data, not sample sets
  eval_run "${dir%/}"
done

small="--sampler ddim --steps 25 --batch 40"
figure_grid "$runs/base" none $small
figure_grid "$runs/base" classifier-3 $small --classifier "$runs/classifier" --classifier-scale 3
figure_grid "$runs/base" cfg-5 $small --cfg 5
figure_grid "$runs/base" cfg-5-rescale $small --cfg 5 --cfg-rescale 0.7

# Tables and plots: one row per folder, the metric columns of eval.csv.
columns="FID-FMNIST FID-FMNIST:floor class_accuracy precision recall count"
{
  echo "run,guidance,scale,rescale,fid_fmnist,fid_floor,class_accuracy,precision,recall,count"
  row() { echo "$1,$2,$3,$4,$(eval_row "$out/$1" $columns)"; }
  row none none 0 0
  for scale in 1 3; do row classifier-$scale classifier $scale 0; done
  for w in 1.5 3 5; do row cfg-$w cfg $w 0; row cfg-$w-rescale cfg $w 0.7; done
} > "$out/guidance.csv"
{
  echo "sampler,steps,fid_fmnist,fid_floor,class_accuracy,precision,recall,count"
  for sampler in ddim dpmpp_2m; do
    for s in 10 25 50; do
      echo "$sampler,$s,$(eval_row "$out/$sampler-$s" $columns)"
    done
  done
  echo "ddpm,1000,$(eval_row "$out/ddpm-1000" $columns)"
} > "$out/samplers.csv"
# One file per curve (the guidance-free run starts each guidance curve at scale 0), then the plots.
series=$out/series; mkdir -p "$series"
awk -F, 'NR > 1 && ($2 == "none" || $2 == "cfg" && $4 == 0)' "$out/guidance.csv" > "$series/cfg.csv"
awk -F, 'NR > 1 && ($2 == "none" || $2 == "cfg" && $4 > 0)' "$out/guidance.csv" > "$series/cfg-rescale.csv"
awk -F, 'NR > 1 && ($2 == "none" || $2 == "classifier")' "$out/guidance.csv" > "$series/classifier.csv"
for sampler in ddim dpmpp_2m ddpm; do awk -F, -v s=$sampler '$1 == s' "$out/samplers.csv" > "$series/$sampler.csv"; done
gnuplot <<GP
set datafile separator ","
set terminal pngcairo size 1100,420 noenhanced
set output "$out/guidance.png"
set multiplot layout 1,2
set key top right
set xlabel "guidance scale (0: none)"
set title "FID-FMNIST (N = $samples; floor $(printf "%.1f" "$(eval_row "$out/none" FID-FMNIST:floor)"))"
plot "$series/cfg.csv" using 3:5 with linespoints title "CFG", \
     "$series/cfg-rescale.csv" using 3:5 with linespoints title "CFG, rescale 0.7", \
     "$series/classifier.csv" using 3:5 with linespoints title "classifier guidance"
set title "class accuracy of the requested class"
set key bottom right
plot "$series/cfg.csv" using 3:7 with linespoints title "CFG", \
     "$series/cfg-rescale.csv" using 3:7 with linespoints title "CFG, rescale 0.7", \
     "$series/classifier.csv" using 3:7 with linespoints title "classifier guidance"
unset multiplot
set terminal pngcairo size 600,420 noenhanced
set output "$out/samplers.png"
set logscale x
set xrange [8:1300]
set xlabel "sampling steps"
set title "FID-FMNIST (N = $n_samplers)"
set key top right
plot "$series/ddim.csv" using 2:3 with linespoints title "DDIM", \
     "$series/dpmpp_2m.csv" using 2:3 with linespoints title "DPM-Solver++ 2M", \
     "$series/ddpm.csv" using 2:3 with points pt 7 ps 1.5 title "DDPM"
GP
echo "wrote $out/guidance.csv, $out/samplers.csv, $out/guidance.png, $out/samplers.png"

# The figures and tables RESULTS.md shows, beside it.
cp "$out/guidance.png" "$out/samplers.png" "$out/guidance.csv" "$out/samplers.csv" "$(dirname "$0")/"

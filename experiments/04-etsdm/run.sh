#!/usr/bin/env bash
# Experiment 4 (002 document, E-TSDM): the network's Lipschitz constant in t near t = 0, with and without
# timestep-condition sharing (t~ = 100, n = 5), and FID-FMNIST with DDIM and DPM-Solver++ at 10 and 25 steps.
# Both models use the demo's recipe (zero terminal SNR, v, min-SNR weights) on Fashion-MNIST.
# Usage: experiments/04-etsdm/run.sh [--full]    (reduced: about 25 minutes on 2 idle cores)
source "$(dirname "$0")/../common.sh"
out=$root/out/experiments/04
mkdir -p "$out"
recipe="--data fashion-mnist --schedule linear --zero-snr --prediction v --loss-weight min-snr --label-dropout 0.1"
train_run train "$runs/base" $recipe $model --steps $steps
train_run train "$runs/etsdm" $recipe $model --steps $steps --etsdm-t-tilde 100 --etsdm-n 5
for name in base etsdm; do
  for sampler in ddim dpmpp_2m; do
    for s in 10 25; do
      sample_run "$runs/$name" "$out/samples-$name-$sampler-$s" --sampler $sampler --steps $s --n $samples --batch 250
    done
  done
done
for name in base etsdm; do
  "$diffuse" analyze lipschitz --model "$runs/$name" --out "$out/lipschitz-$name"
  for sampler in ddim dpmpp_2m; do
    for s in 10 25; do eval_run "$out/samples-$name-$sampler-$s"; done
  done
done

# How much FID-FMNIST moves with the sampling seed alone at this N: the DPM-Solver++ 25-step runs again, seed 1.
for name in base etsdm; do
  sample_run "$runs/$name" "$out/samples-$name-dpmpp_2m-25-seed1" --sampler dpmpp_2m --steps 25 --n $samples --batch 250 --seed 1
  eval_run "$out/samples-$name-dpmpp_2m-25-seed1"
done

for name in base etsdm; do figure_grid "$runs/$name" $name --sampler dpmpp_2m --steps 25 --batch 40; done

# One table and one figure: FID-FMNIST per model, sampler and step count; K(t) of both models on one plot.
{
  echo "model,sampler,steps,fid_fmnist,fid_floor,precision,recall,class_accuracy"
  for name in base etsdm; do
    for sampler in ddim dpmpp_2m; do
      for s in 10 25 25-seed1; do
        dir="$out/samples-$name-$sampler-$s"
        [ -f "$dir/eval.csv" ] || continue
        echo "$name,$sampler,$s,$(eval_row "$dir" FID-FMNIST FID-FMNIST:floor precision recall class_accuracy)"
      done
    done
  done
} > "$out/fid.csv"
awk -F, 'NR > 1 && $1 < 100 { s[FILENAME] += $5; n[FILENAME]++ } END { for (f in s) printf "%s mean K over t < 100: %.4f\n", f, s[f] / n[f] }' \
  "$out/lipschitz-base/lipschitz.csv" "$out/lipschitz-etsdm/lipschitz.csv" | tee "$out/lipschitz-summary.txt"
gnuplot <<GP
set datafile separator ","
set terminal pngcairo size 1100,420 noenhanced
set output "$out/lipschitz.png"
set multiplot layout 1,2
set xlabel "t"
set ylabel "K(t, t + dt)"
set title "near t = 0 (pairs t, t + 2)"
set xrange [0:120]
plot "$out/lipschitz-base/lipschitz.csv" using 1:5 with linespoints title "base", \\
     "$out/lipschitz-etsdm/lipschitz.csv" using 1:5 with linespoints title "E-TSDM (t~ 100, n 5)"
set title "all t"
set xrange [*:*]
set logscale y
plot "$out/lipschitz-base/lipschitz.csv" using 1:5 with lines title "base", \\
     "$out/lipschitz-etsdm/lipschitz.csv" using 1:5 with lines title "E-TSDM (t~ 100, n 5)"
unset multiplot
GP
echo "wrote $out/fid.csv, $out/lipschitz-summary.txt and $out/lipschitz.png"

# The figures and tables RESULTS.md shows, beside it.
cp "$out/lipschitz.png" "$out/fid.csv" "$out/lipschitz-summary.txt" "$(dirname "$0")/"

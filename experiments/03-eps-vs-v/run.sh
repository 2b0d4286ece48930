#!/usr/bin/env bash
# Experiment 3 (000 document): eps and v losses. For the same x0 error, L_v / L_eps = (SNR + 1) / SNR.
# Three models on Fashion-MNIST with the linear schedule (terminal SNR 4e-5: eps prediction stays defined):
#   eps:       eps prediction, uniform weight (plain eps MSE)
#   v:         v prediction, uniform weight (plain v MSE = eps MSE weighted by (SNR+1)/SNR)
#   v-epsw:    v prediction weighted back to eps-equivalence (--loss-weight eps), which should train like `eps`
# `diffuse analyze loss` measures each model's loss per timestep in every target.
# Usage: experiments/03-eps-vs-v/run.sh [--full]    (reduced: about 35 minutes on 2 idle cores)
source "$(dirname "$0")/../common.sh"
out=$root/out/experiments/03
mkdir -p "$out"
data="--data fashion-mnist --schedule linear --label-dropout 0.1"
train_run train "$runs/eps" $data $model --steps $steps --prediction eps --loss-weight uniform
train_run train "$runs/v" $data $model --steps $steps --prediction v --loss-weight uniform
train_run train "$runs/v-epsw" $data $model --steps $steps --prediction v --loss-weight eps
for name in eps v v-epsw; do
  "$diffuse" analyze loss --model "$runs/$name" --out "$out/loss-$name"
  sample_run "$runs/$name" "$out/samples-$name" --sampler ddim --steps 25 --spacing linspace --n $samples --batch 250
  eval_run "$out/samples-$name"
done

# The eps model once more with its x0 estimates clamped to [-1, 1] (clip_sample): at t = 999 of the linear
# schedule x0 = (x_t - s eps) / a multiplies the eps error by s / a = 157, which clipping contains.
sample_run "$runs/eps" "$out/samples-eps-clip" --sampler ddim --steps 25 --spacing linspace --n $samples --batch 250 --clip-sample 1
eval_run "$out/samples-eps-clip"
figure_grid "$runs/eps" eps-clip --sampler ddim --steps 25 --spacing linspace --batch 40 --clip-sample 1

# For experiment 4: K(t) near t = 0 of an eps-prediction model (the 002 document's singularity is about eps).
[ -f "$out/lipschitz-eps/lipschitz.csv" ] || "$diffuse" analyze lipschitz --model "$runs/eps" --out "$out/lipschitz-eps"

for name in eps v v-epsw; do figure_grid "$runs/$name" $name --sampler ddim --steps 25 --spacing linspace --batch 40; done

# Tables and plots. The three loss analyses share t grid, images and noise, so their rows line up.
#  - the training loss each model minimised (mean of the logged loss over the last quarter of training);
#  - per t: L_v of the v model over L_eps of the eps model against (SNR+1)/SNR, and each model's error
#    converted to eps (v-epsw should follow eps).
last_quarter_mean() { awk -F, -v from=$((steps * 3 / 4)) 'NR > 1 && $1 > from { s += $2; n++ } END { printf "%.6g", s / n }' "$1/log.csv"; }
{
  echo "model,prediction,loss_weight,training_loss_last_quarter"
  echo "eps,eps,uniform,$(last_quarter_mean "$runs/eps")"
  echo "v,v,uniform,$(last_quarter_mean "$runs/v")"
  echo "v-epsw,v,eps,$(last_quarter_mean "$runs/v-epsw")"
} > "$out/training-loss.csv"
{
  echo "samples,fid_fmnist,fid_floor,precision,recall,class_accuracy"
  for name in eps eps-clip v v-epsw; do
    echo "$name,$(eval_row "$out/samples-$name" FID-FMNIST FID-FMNIST:floor precision recall class_accuracy)"
  done
} > "$out/fid.csv"
paste -d, "$out/loss-eps/loss_per_t.csv" "$out/loss-v/loss_per_t.csv" "$out/loss-v-epsw/loss_per_t.csv" |
  awk -F, 'NR == 1 { print "t,snr,predicted_ratio,measured_ratio_Lv_of_v_over_Leps_of_eps,Leps_eps_model,Leps_v_model,Leps_v_epsw_model,Lv_eps_model,Lv_v_model,Lv_v_epsw_model"; next }
           { printf "%s,%s,%s,%.6g,%s,%s,%s,%s,%s,%s\n", $1, $3, $9, ($5 + 0 == 0 ? 0 : $15 / $5), $5, $14, $23, $6, $15, $24 }' > "$out/loss-compare.csv"
gnuplot <<GP
set datafile separator ","
set terminal pngcairo size 1100,420 noenhanced
set output "$out/loss-compare.png"
set multiplot layout 1,2
set logscale y
set format y "%g"
set xlabel "t"
set key top left
set title "L_v of the v model / L_eps of the eps model"
plot "$out/loss-compare.csv" using 1:4 with linespoints title "measured", \\
     "$out/loss-compare.csv" using 1:3 with lines title "(SNR+1)/SNR"
set title "error converted to eps, per model (held-out images)"
set key top right
plot "$out/loss-compare.csv" using 1:5 with linespoints title "eps model", \\
     "$out/loss-compare.csv" using 1:6 with linespoints title "v model", \\
     "$out/loss-compare.csv" using 1:7 with linespoints title "v model, eps-equivalent weights"
unset multiplot
GP
echo "wrote $out/training-loss.csv, $out/loss-compare.csv, $out/loss-compare.png"

# The figures and tables RESULTS.md shows, beside it.
cp "$out/loss-compare.png" "$out/loss-compare.csv" "$out/training-loss.csv" "$out/fid.csv" "$(dirname "$0")/"

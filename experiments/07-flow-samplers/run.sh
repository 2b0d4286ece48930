#!/usr/bin/env bash
# Experiment 7 (the continuous-time issue): a rectified-flow model and a v model trained with the same budget on
# Fashion-MNIST, each sampled at 5, 10 and 25 steps with euler, dpmpp_2m, dpmpp_3m and unipc (bh2, order 2) on two
# spacings: the v model's trailing and karras, the flow model's shifted linspace (FlowMatchEulerDiscreteScheduler's)
# and karras. FID-FMNIST at N = 500 (N=1000 for the issue's size) for every cell.
# Usage: experiments/07-flow-samplers/run.sh [--full]   (reduced: about 50 minutes on 2 idle cores)
source "$(dirname "$0")/../common.sh"
out=$root/out/experiments/07
mkdir -p "$out"
n=${N:-500}
recipe="--data fashion-mnist --label-dropout 0.1 $model --steps $steps"
# The v model is experiment 4's base model (the demo recipe); the flow model differs only in its path and target.
train_run train "$runs/base" $recipe --schedule linear --zero-snr --prediction v --loss-weight min-snr
train_run train "$runs/flow" $recipe --path rectified-flow --prediction flow --flow-shift 1 --timestep-density logit-normal

for model in base flow; do
  for spacing in default karras; do
    if [ $spacing = default ]; then sp=$([ $model = base ] && echo "--spacing trailing" || echo ""); else sp="--spacing karras"; fi
    for s in 10 5 25; do
      for sampler in euler dpmpp_2m dpmpp_3m unipc; do
        dir="$out/$model-$spacing-$sampler-$s"
        sample_run "$runs/$model" "$dir" --sampler $sampler --steps $s $sp --n $n --batch 250
        eval_run "$dir"
      done
    done
  done
done

columns="FID-FMNIST FID-FMNIST:floor class_accuracy count"
{
  echo "model,spacing,sampler,steps,fid_fmnist,fid_floor,class_accuracy,count"
  for model in base flow; do
    for spacing in default karras; do
      name=$spacing; [ $spacing = default ] && name=$([ $model = base ] && echo trailing || echo linspace-shifted)
      for sampler in euler dpmpp_2m dpmpp_3m unipc; do
        for s in 5 10 25; do
          dir="$out/$model-$spacing-$sampler-$s"
          [ -f "$dir/eval.csv" ] && echo "$([ $model = base ] && echo v || echo rectified-flow),$name,$sampler,$s,$(eval_row "$dir" $columns)"
        done
      done
    done
  done
} > "$(dirname "$0")/fid.csv"
cat "$(dirname "$0")/fid.csv"

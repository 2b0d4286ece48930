# Shared by the experiment scripts (source it): the CLI, --full, and steps that skip finished work, so an
# interrupted experiment continues where it stopped when run again.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
diffuse=${DIFFUSE:-$root/build/diffuse}
[ -x "$diffuse" ] || { echo "error: $diffuse not built (run scripts/setup.sh build)" >&2; exit 1; }
full=0
for arg in "$@"; do [ "$arg" = --full ] && full=1; done
runs=${RUNS:-$root/out/experiments/runs}   # trained models, shared by the experiments
mkdir -p "$runs"

# The small Fashion-MNIST model of the reduced runs (about 1.1M parameters, minutes on 2 cores), and the
# reference-sized one of --full runs (6.5M parameters; a GPU: add --device cuda through EXTRA_TRAIN).
if [ $full = 1 ]; then
  model="--channels 64,128,128 --layers-per-block 2 --attention-levels 1 --batch 128 --lr 2e-4 --warmup 500 --ema-decay 0.9999"
  steps=${STEPS:-30000}
  samples=${SAMPLES:-10000}
else
  model="--channels 32,64,64 --layers-per-block 1 --attention-levels none --norm-groups 16 --batch 32 --lr 5e-4 --warmup 100 --ema-decay 0.999"
  steps=${STEPS:-1200}
  samples=${SAMPLES:-500}
fi
extra_train=${EXTRA_TRAIN:-}
extra_sample=${EXTRA_SAMPLE:-}

# train_run COMMAND RUN ARGS...: `diffuse COMMAND --out RUN ARGS` unless RUN is finished; an interrupted run
# is resumed, one killed before its first checkpoint is started again.
train_run() {
  local cmd=$1 run=$2; shift 2
  if [ -f "$run/train_state/state.json" ]; then
    "$diffuse" "$cmd" --out "$run" --resume --quiet
  else
    "$diffuse" "$cmd" --out "$run" --overwrite --checkpoint-every 500 --log-every 100 $extra_train "$@"
  fi
}

# sample_run RUN OUT ARGS...: samples into OUT unless OUT/grid.png exists.
sample_run() {
  local run=$1 out=$2; shift 2
  [ -f "$out/grid.png" ] && { echo "reusing $out"; return; }
  "$diffuse" sample --model "$run" --out "$out" --quiet $extra_sample "$@"
}

# eval_run DIR [ARGS...]: `diffuse eval` of the samples in DIR (FID-FMNIST and the rest, with the real-data
# floor) unless DIR/eval.json exists.
eval_run() {
  local dir=$1; shift
  [ -f "$dir/eval.json" ] || "$diffuse" eval --samples "$dir" "$@"
}

# figure_grid RUN NAME ARGS...: the first 40 images of a sample_run with ARGS (same seeds, so the same images
# as the evaluated set's first 40) as a 10-column grid, copied to the experiment's folder as grid-NAME.png.
figure_grid() {
  local run=$1 name=$2; shift 2
  sample_run "$run" "$out/grid-$name" "$@" --n 40 --grid-cols 10
  cp "$out/grid-$name/grid.png" "$(dirname "${BASH_SOURCE[1]}")/grid-$name.png"
}

# eval_row DIR METRIC...: the samples' values of the METRICs (rows of DIR/eval.csv), comma-separated in the order
# given; METRIC:floor stands for that metric's floor.
eval_row() {
  local csv=$1/eval.csv; shift
  local keys; keys=$(IFS=,; echo "$*")
  awk -F, -v keys="$keys" 'NR > 1 { value[$1] = $2; floor[$1] = $3 }
    END { n = split(keys, k, ","); for (i = 1; i <= n; i++) { m = k[i]; v = sub(/:floor$/, "", m) ? floor[m] : value[m];
          printf "%s%s", (i > 1 ? "," : ""), v } print "" }' "$csv"
}

#!/usr/bin/env bash
# Kill harness: trains a small run straight through, then trains it again in rounds: each round starts the run,
# stops it at random moments (SIGKILL mostly, some SIGTERM / SIGINT; often before the first checkpoint, during
# one, or several times between two) and resumes it each time until it finishes, then compares every file of its
# run folder with the straight run's: weights, EMA, optimizer state, RNG state, scheduler config, run.json,
# state.json, loss.png, and log.csv but its images/s column (wall time). Both runs train in the same folder path
# (run.json records it). A resume that fails or any difference fails the harness.
# Usage: scripts/kill-harness.sh [STOPS] [BUILD_DIR]   (default 30 stops in all, build/)
set -euo pipefail
cd "$(dirname "$0")/.."
stops=${1:-30}
cli=${2:-build}/diffuse
work=$(mktemp -d)
trap '[ -n "${KEEP:-}" ] && echo "kill-harness: kept $work" || rm -rf "$work"' EXIT
RANDOM=17  # the kill moments are reproducible too

args=(--data synthetic-shapes --synthetic-count 256 --size 16 --channels 16,32 --attention-levels none
      --norm-groups 8 --batch 8 --steps 40 --checkpoint-every 3 --log-every 2 --threads 1 --seed 7 --quiet)
start=$(date +%s.%N)
"$cli" train "${args[@]}" --out "$work/run" >/dev/null 2>&1
straight_ms=$(echo "($(date +%s.%N) - $start) * 1000 / 1" | bc)
mv "$work/run" "$work/straight"
echo "kill-harness: straight run $straight_ms ms; stopping others $stops times in all, after [0, $((straight_ms * 2 / 3))) ms"

# Every file of the finished run in $work/run against the straight run; prints each difference, returns the count.
compare() {
  local diffs=0 f
  while IFS= read -r f; do
    if [ "$f" = ./log.csv ]; then
      cmp -s <(cut -d, -f4 --complement "$work/straight/$f") <(cut -d, -f4 --complement "$work/run/$f") ||
        { echo "kill-harness: differs: $f"; diffs=$((diffs + 1)); }
    elif ! cmp -s "$work/straight/$f" "$work/run/$f"; then
      echo "kill-harness: differs: $f"; diffs=$((diffs + 1))
    fi
  done < <(cd "$work/straight" && find . -type f | sort)
  local extra
  extra=$(comm -13 <(cd "$work/straight" && find . -type f | sort) <(cd "$work/run" && find . -type f | sort))
  [ -z "$extra" ] || { echo "kill-harness: only in the stopped run: $extra"; diffs=$((diffs + 1)); }
  return $diffs
}

declare -A by_signal=()
stopped=0 resumed=0 restarted=0 rounds=0
while ((stopped < stops)); do
  rounds=$((rounds + 1))
  rm -rf "$work/run" "$work/out.txt"
  while :; do
    if [ -f "$work/run/run.json" ] && ! grep -q "has no checkpoint yet" "$work/out.txt" 2>/dev/null; then
      cmd=("$cli" train --out "$work/run" --resume --threads 1 --quiet)
    else  # not started, or stopped before its first checkpoint: start again, as the error message says
      cmd=("$cli" train "${args[@]}" --out "$work/run" --overwrite)
    fi
    "${cmd[@]}" >"$work/out.txt" 2>&1 &
    pid=$!
    if ((stopped < stops)); then
      sleep "$(echo "scale=3; $((RANDOM % (straight_ms * 2 / 3))) / 1000" | bc)"
      sig=KILL
      case $((RANDOM % 6)) in 0) sig=TERM ;; 1) sig=INT ;; esac
      if kill -s "$sig" "$pid" 2>/dev/null; then
        stopped=$((stopped + 1))
        by_signal[$sig]=$((${by_signal[$sig]:-0} + 1))
      fi
    fi
    set +e
    wait "$pid" 2>/dev/null
    rc=$?
    set -e
    [[ ${cmd[*]} == *--resume* ]] && resumed=$((resumed + 1)) || restarted=$((restarted + 1))
    ((rc == 0)) && break
    grep -q "has no checkpoint yet" "$work/out.txt" && continue
    # Stopped: SIGKILL 137; SIGTERM / SIGINT checkpoint and exit 128 + signal. Anything else is a failure.
    if ((rc != 137 && rc != 130 && rc != 143)); then
      echo "kill-harness: FAILED: '${cmd[*]}' exited $rc:"; cat "$work/out.txt"; exit 1
    fi
  done
  if ! compare; then echo "kill-harness: FAILED in round $rounds"; exit 1; fi
done
files=$(cd "$work/straight" && find . -type f | wc -l)
echo "kill-harness: $stopped stops (KILL ${by_signal[KILL]:-0}, TERM ${by_signal[TERM]:-0}, INT ${by_signal[INT]:-0})" \
     "over $rounds rounds: $resumed resumes, $restarted starts; every round's $files files byte-identical to the straight run"

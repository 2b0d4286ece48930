#!/usr/bin/env bash
# Fuzzes diffuse's parsers with clang's libFuzzer under AddressSanitizer + UndefinedBehaviorSanitizer.
# Usage: scripts/fuzz.sh [SECONDS] [TARGET ...]   (default 60 s each; targets: safetensors idx image_folder json_configs)
# Builds build-fuzz/ (clang, -DDIFFUSE_FUZZ=ON), starts each target from the committed corpus fuzz/corpus/TARGET
# (read only: new inputs go to build-fuzz/corpus/TARGET), and prints its executions and crashes. A crash leaves
# its input in build-fuzz/crashes/; replay it with build/fuzz/replay_TARGET FILE, and commit it to the corpus with
# the fix. Memory: an input that makes a parser allocate over 2 GiB is a crash (-malloc_limit_mb).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
targets=("$@")
((${#targets[@]})) || targets=(safetensors idx image_folder json_configs)

scripts/install-packages.sh clang libclang-rt-14-dev

flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fsanitize=fuzzer-no-link -fno-omit-frame-pointer"
if [ ! -f build-fuzz/CMakeCache.txt ]; then
  cmake -S . -B build-fuzz -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDIFFUSE_FUZZ=ON \
    -DDIFFUSE_BUILD_TESTS=OFF -DDIFFUSE_BUILD_BENCH=OFF -DCMAKE_CXX_FLAGS="$flags" >/dev/null
fi
cmake --build build-fuzz -j2 --target "${targets[@]/#/fuzz_}"

mkdir -p build-fuzz/crashes
status=0
for t in "${targets[@]}"; do
  mkdir -p "build-fuzz/corpus/$t"
  log="build-fuzz/fuzz_$t.log"
  began=$(date +%s)
  set +e
  ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=0 UBSAN_OPTIONS=print_stacktrace=1 \
    "build-fuzz/fuzz/fuzz_$t" "build-fuzz/corpus/$t" "fuzz/corpus/$t" -max_total_time="$seconds" \
    -rss_limit_mb=4096 -malloc_limit_mb=2048 -timeout=30 -max_len=65536 -print_final_stats=1 \
    -artifact_prefix="build-fuzz/crashes/$t-" >"$log" 2>&1
  rc=$?
  set -e
  took=$(($(date +%s) - began))
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  crashes=$(ls build-fuzz/crashes | grep -c "^$t-" || true)
  echo "fuzz: $t: ${execs:-?} executions in $took s (limit $seconds s), exit $rc, $crashes crash/timeout/oom inputs in build-fuzz/crashes (log $log)"
  ((rc == 0)) || status=1
done
exit $status

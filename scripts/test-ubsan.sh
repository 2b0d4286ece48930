#!/usr/bin/env bash
# The default test suite built with UndefinedBehaviorSanitizer (gcc; float-to-integer overflow included): any
# undefined behaviour aborts the program that hits it, so the test running it fails, whether it is the test
# binary or the CLI a test starts. Build in build-ubsan/ (about 25 minutes on 2 cores from scratch), then CTest.
# Usage: scripts/test-ubsan.sh [extra ctest arguments]   (the packages come from scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
sanitize="-fsanitize=undefined,float-cast-overflow -fno-sanitize-recover=all -fno-omit-frame-pointer"
if [ ! -f build-ubsan/CMakeCache.txt ]; then
  cmake -S . -B build-ubsan -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS_RELEASE="-O2 -DNDEBUG" \
    -DCMAKE_CXX_FLAGS="$sanitize" -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=undefined" -DDIFFUSE_BUILD_BENCH=OFF >/dev/null
fi
cmake --build build-ubsan -j2
cd build-ubsan
UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 ctest -j2 -LE slow --output-on-failure "$@"

#!/usr/bin/env bash
# Builds diffuse (installing what is missing) and runs the default test suite.
# Extra arguments go to ctest, e.g. scripts/test.sh -L slow, scripts/test.sh -R schedule.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh build
cd build
ctest --output-on-failure -j2 --timeout 600 -LE slow "$@"

#!/usr/bin/env bash
# The test suite, offline, on the CPU: installs what it needs, then runs pytest (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
# the tests run here: a new environment gets the CPU build of torch where this machine has no GPU (setup_env.sh)
TORCH_SPEC="${TORCH_SPEC:-auto}"
source scripts/setup_env.sh
# the HTML report is checked in headless Chromium (Debian's package)
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "installing chromium for the report test"
    apt-get install -y -q chromium >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# The whole suite runs its test files in parallel, one pytest-xdist worker per core, at most 4 (each worker builds
# its own tiny models and runs; TEST_WORKERS overrides, 1 turns it off), each worker's torch on one thread: the tiny
# models gain nothing from a second thread (a 46 s test takes 46 s on one thread or two), so two files at once take
# half the time. A subset (extra arguments) runs in one process, where -s shows its printed figures.
# the whole tests/ folder unless an argument names a test file or folder (tests/test_text.py, tests/x.py::test_y)
where=tests
for arg in "$@"; do [ -e "${arg%%::*}" ] && where=; done
cores="$(nproc)"
workers="${TEST_WORKERS:-$([ $# -eq 0 ] && echo $((cores < 4 ? cores : 4)) || echo 1)}"
if [ "$workers" -gt 1 ]; then
    export OMP_NUM_THREADS=1
    python -m pytest -q -n "$workers" --dist loadfile --durations=20 "$@" $where
else
    python -m pytest -q "$@" $where
fi

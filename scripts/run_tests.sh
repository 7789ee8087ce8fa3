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
python -m pytest -q "$@" tests

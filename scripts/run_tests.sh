#!/usr/bin/env bash
# The test suite, offline, on the CPU: installs what it needs, then runs pytest (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m pytest -q "$@" tests

# Create (once) and activate the project's virtual environment, installing requirements.txt.
# Sourced by scripts/demo.sh and scripts/run_tests.sh; run it yourself with `source scripts/setup_env.sh`.
#   VENV_DIR     where the environment lives (default: .venv in the repository)
#   TORCH_SPEC   the torch requirement installed before the rest (default: torch==2.13.0 when no
#                NVIDIA GPU is visible, so a CPU-only machine does not download a CUDA build;
#                on a GPU node the default is requirements.txt's torch)
#   PIP_EXTRA    extra pip arguments, e.g. "--index-url https://download.pytorch.org/whl/cpu"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_DIR="${VENV_DIR:-$repo_root/.venv}"
if [ ! -x "$VENV_DIR/bin/python" ]; then
    echo "creating virtual environment in $VENV_DIR"
    "${PYTHON:-python3}" -m venv "$VENV_DIR" || return 1
fi
# shellcheck disable=SC1091
source "$VENV_DIR/bin/activate"
stamp="$VENV_DIR/.requirements.sha256"
wanted="$(sha256sum "$repo_root/requirements.txt" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    python -m pip install -q --upgrade pip
    if ! python -c "import torch" 2>/dev/null; then
        if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
            spec="${TORCH_SPEC:-torch>=2.4}"
        else
            spec="${TORCH_SPEC:-torch==2.13.0}"
        fi
        echo "installing $spec"
        # shellcheck disable=SC2086
        python -m pip install -q ${PIP_EXTRA:-} "$spec" || return 1
    fi
    echo "installing requirements.txt"
    # shellcheck disable=SC2086
    python -m pip install -q ${PIP_EXTRA:-} -r "$repo_root/requirements.txt" || return 1
    echo "$wanted" > "$stamp"
fi

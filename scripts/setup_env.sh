# Create (once) and activate the project's virtual environment, installing requirements.txt.
# Run it yourself with `source scripts/setup_env.sh` (on the cluster: once, on a login node; the jobs use the
# environment it makes); scripts/demo.sh and scripts/run_tests.sh source it too.
#   VENV_DIR     where the environment lives (default: .venv in the repository)
#   TORCH_SPEC   which torch is installed before the rest:
#                  (unset)  requirements.txt's torch: on Linux x86_64 PyPI's default wheel, the CUDA build, which
#                           GPU nodes need, whether or not this machine has a GPU (login nodes usually have none)
#                  cpu      the CPU build, torch==2.13.0, for CPU-only machines; the default under CI (CI=true).
#                           Where PyPI's torch==2.13.0 is the CUDA build (Linux x86_64), add
#                           PIP_EXTRA="--extra-index-url https://download.pytorch.org/whl/cpu"
#                  auto     cpu where this machine has no NVIDIA GPU, else the default: what demo.sh and run_tests.sh
#                           use, as they run here
#                  other    a pip requirement, e.g. "torch==2.5.1" (with PIP_EXTRA for another CUDA's index)
#                An environment that has torch keeps it; one whose torch is a CPU-only build where a GPU build was
#                asked for gets a one-line warning, as GPU jobs would stop (or train on the CPU with --allow-cpu).
#   PIP_EXTRA    extra pip arguments, e.g. "--index-url https://download.pytorch.org/whl/cu121"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_DIR="${VENV_DIR:-$repo_root/.venv}"
CPU_TORCH="torch==2.13.0"
DEFAULT_TORCH="$(grep -E '^torch([^a-z_-]|$)' "$repo_root/requirements.txt" | cut -d'#' -f1 | tr -d ' ')"

# The pip requirement for torch that TORCH_SPEC (or CI) chooses; see above.
torch_requirement() {
    local choice="${TORCH_SPEC:-}"
    if [ -z "$choice" ] && [ "${CI:-}" = true ]; then
        choice=cpu  # CI machines have no GPU, and a CUDA build is gigabytes to download
    fi
    if [ "$choice" = auto ]; then
        if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then choice=""; else choice=cpu; fi
    fi
    case "$choice" in
        cpu) echo "$CPU_TORCH" ;;
        "") echo "$DEFAULT_TORCH" ;;
        *) echo "$choice" ;;
    esac
}

if [ ! -x "$VENV_DIR/bin/python" ]; then
    echo "creating virtual environment in $VENV_DIR"
    "${PYTHON:-python3}" -m venv "$VENV_DIR" || return 1
fi
# shellcheck disable=SC1091
source "$VENV_DIR/bin/activate"
spec="$(torch_requirement)"
stamp="$VENV_DIR/.requirements.sha256"
wanted="$(sha256sum "$repo_root/requirements.txt" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    python -m pip install -q --upgrade pip
    if ! python -c "import torch" 2>/dev/null; then
        echo "installing $spec"
        # shellcheck disable=SC2086
        python -m pip install -q ${PIP_EXTRA:-} "$spec" || return 1
    fi
    echo "installing requirements.txt"
    # shellcheck disable=SC2086
    python -m pip install -q ${PIP_EXTRA:-} -r "$repo_root/requirements.txt" || return 1
    echo "$wanted" > "$stamp"
fi
# The default (GPU) setup on the platform whose default torch is the CUDA build: say so if the torch here is a
# CPU-only build, installed earlier (e.g. by an older setup_env.sh on a login node without a GPU) and kept
if [ "$spec" = "$DEFAULT_TORCH" ] && [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ]; then
    cpu_only=$(python -c 'import torch; print("" if torch.version.cuda or torch.version.hip else torch.__version__)' \
               2>/dev/null || true)
    if [ -n "$cpu_only" ]; then
        echo "warning: $VENV_DIR has torch $cpu_only, a CPU-only build, but this setup is for GPU jobs (they would" \
             "stop): remove $VENV_DIR and source scripts/setup_env.sh again, or set TORCH_SPEC=cpu where this" \
             "machine is meant to be CPU-only" >&2
    fi
fi

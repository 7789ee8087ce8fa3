# Sourced by ft_train.sh, peft_train.sh, test.sh, multi_gpu_train.sh and sweep.sh from the repository root, which
# pass on their own arguments (the job's flags): activate the environment, tell the run whether the job asked for
# a GPU, and point it at the checkpoints scripts/get_data.py fetched.
if [ ! -d src/base ]; then
    echo "error: $(pwd) is not the repository root: submit the job from there (qsub ft_train.sh ...)" >&2
    return 2
fi
# Load site modules here if your cluster needs them, e.g.:  module load python/3.11 cuda/12.4
# shellcheck disable=SC1091
if ! source "${VENV_DIR:-.venv}/bin/activate"; then
    echo "error: no environment at ${VENV_DIR:-.venv}: run 'source scripts/setup_env.sh' once on a login node" >&2
    return 2
fi
export PYTHONUNBUFFERED=1
[ -n "${NSLOTS:-}" ] && export OMP_NUM_THREADS="$NSLOTS"

# The job's hard resource requests as `qstat -j` shows them (e.g. gpu=1,h_rt=86400); empty outside SGE, or where
# the qmaster does not answer in 20 s.
job_resources=""
if [ -n "${JOB_ID:-}" ] && command -v qstat >/dev/null 2>&1; then
    job_resources=$(timeout 20 qstat -j "$JOB_ID" 2>/dev/null | sed -n 's/^hard[ _]resource_list:[[:space:]]*//p' | head -1)
fi
# A job that asked for a GPU (a resource named like gpu or cuda, with a count above 0: -l gpu=1) gets
# JOB_GPU_REQUEST: if torch then sees no GPU, the run stops at its start with one line (exit status 2) instead of
# training on the CPU; --allow-cpu or ALLOW_CPU=1 lets it run there (src/base/distributed.py). CUDA_VISIBLE_DEVICES
# set by the cluster counts as such a request too.
gpu_request=$(echo "$job_resources" | tr ',' '\n' | grep -Ei '^[^=]*(gpu|cuda)[^=]*=0*[1-9]' | head -1)
[ -n "$gpu_request" ] && export JOB_GPU_REQUEST="$gpu_request"
# The Hugging Face cache that get_data.py --checkpoints filled (HF_HOME, set in src/base/constants.py), and
# HF_HUB_OFFLINE=1 when it holds the checkpoints this job starts from: a compute node without internet then does
# not spend half a minute asking the hub. A checkpoint missing from it stops the run with one line naming
# `python scripts/get_data.py --checkpoints NAME` (src/base/hub.py says which checkpoints count).
eval "$(python -m src.base.hub "$@")"
echo "$(date '+%F %T') job ${JOB_ID:-local} on $(hostname), GPU: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo none), HF_HOME=${HF_HOME:-}${HF_HUB_OFFLINE:+ HF_HUB_OFFLINE=$HF_HUB_OFFLINE}"

# The job's run-time limit, for --time-limit: its own h_rt from `qstat -j` (seconds or HH:MM:SS), else $1 (the
# wrapper's TIME_LIMIT line); nothing outside SGE. A qmaster that does not answer in 20 s falls back to $1.
job_time_limit() {
    [ -n "${JOB_ID:-}" ] || return 0
    local h_rt
    h_rt=$(echo "$job_resources" | tr ',' '\n' | sed -n 's/^h_rt=\([0-9:]*\).*/\1/p' | head -1)
    echo "${h_rt:-${1:-}}"
}

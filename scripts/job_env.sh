# Sourced by ft_train.sh, peft_train.sh and test.sh from the repository root: activate the environment.
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
echo "$(date '+%F %T') job ${JOB_ID:-local} on $(hostname), GPU: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo none)"

# The job's run-time limit, for --time-limit: its own h_rt from `qstat -j` (seconds or HH:MM:SS), else $1 (the
# wrapper's TIME_LIMIT line); nothing outside SGE. A qmaster that does not answer in 20 s falls back to $1.
job_time_limit() {
    [ -n "${JOB_ID:-}" ] || return 0
    local h_rt=""
    if command -v qstat >/dev/null 2>&1; then
        h_rt=$(timeout 20 qstat -j "$JOB_ID" 2>/dev/null \
               | sed -n 's/^hard[ _]resource_list:.*[[:space:],]h_rt=\([0-9:]*\).*/\1/p' | head -1)
    fi
    echo "${h_rt:-${1:-}}"
}

#!/bin/bash
# Training on several GPUs of one node: one process per GPU (PyTorch DDP through accelerate), started by torchrun.
#   qsub -l gpu=4 multi_gpu_train.sh ft   [flags for src.ft.train]     e.g. --batch-size 64 --lr 4e-5
#   qsub -l gpu=2 multi_gpu_train.sh peft [flags for src.peft.train]
#   NGPUS=2 bash multi_gpu_train.sh ft ...                              (a workstation; on a CPU: 2 gloo processes)
# --batch-size is the images per optimizer step over all GPUs together, so a run with the same flags on 1 or N
# GPUs trains on the same batches; each GPU takes its share (set --grad-accum if a share does not fit).
# Processes: the number of GPUs SGE granted (CUDA_VISIBLE_DEVICES), else all of the node's, or NGPUS.
# A job that asked for GPUs (-l gpu=N, or CUDA_VISIBLE_DEVICES) whose torch sees none stops before starting them,
# with one line and status 2 (scripts/job_env.sh, src/base/distributed.py); --allow-cpu runs gloo processes instead.
#
# Preemption: SGE's -notify signals (SIGUSR1/SIGUSR2) and SIGTERM, sent to this script or to the job's whole
# process group, reach this script alone: torchrun runs in a session of its own (it would die of SIGUSR1 and kill
# its workers 30 s after a SIGTERM). The script passes each signal to every training process (torchrun starts them
# in sessions of their own too); they finish their step or validation batch together, rank 0 saves the state, and
# all of them exit. This script waits for that, then exits with status 99 (SGE requeues the job; the requeued job
# resumes the run by itself) only if the run left its note that it saved (STOPPED_FILE), else with torchrun's
# status. If the job is killed outright (SIGKILL), torchrun dies with this script and the training processes with
# torchrun: nothing outlives the job. A second run in the same --output-dir is refused (the directory's .lock).
# Run-time limit: as ft_train.sh, the job's own h_rt (else the TIME_LIMIT line; keep it equal to h_rt) goes to
# --time-limit; a run that stops for it exits 99 too (torchrun itself would exit 1: the run leaves its note in
# STOPPED_FILE that this script reads).
# Resource names (-l gpu=N, -pe smp) differ between clusters: check `qconf -sc`.
#$ -N blip_multi
#$ -cwd
#$ -j y
#$ -o logs/$JOB_NAME.$JOB_ID.log
#$ -l gpu=4
#$ -pe smp 32
#$ -l h_rt=24:00:00
#$ -notify
TIME_LIMIT=24:00:00
set -uo pipefail
method="${1:-}"
if [ "$method" != ft ] && [ "$method" != peft ]; then
    echo "usage: multi_gpu_train.sh ft|peft [flags for src.<method>.train]" >&2
    exit 2
fi
shift
cd "${SGE_O_WORKDIR:-$(dirname "$0")}" && source scripts/job_env.sh || exit 2
# the GPU check each training process makes, once, here: one line and status 2, not one error per process
python -m src.base.distributed "$@" || exit

if [ -n "${NGPUS:-}" ]; then
    gpus="$NGPUS"
elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    gpus=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
else
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c GPU)
fi
if [ "${gpus:-0}" -lt 1 ]; then
    echo "error: no GPU found (set NGPUS to the number of processes to start)" >&2
    exit 2
fi
echo "starting $gpus training processes"

limit=$(job_time_limit "$TIME_LIMIT")  # empty outside SGE: no limit
STOPPED_FILE=$(mktemp "${TMPDIR:-/tmp}/stopped.XXXXXX") && rm -f "$STOPPED_FILE" || exit 2
export STOPPED_FILE  # rank 0 creates it if the run stops to be resumed (a signal or the time limit)
launcher="" signalled=""
forward() { signalled="$1"; [ -n "$launcher" ] && pkill "-$1" -P "$launcher"; }  # torchrun's children: the training processes
trap 'forward USR1' USR1
trap 'forward USR2' USR2
trap 'forward TERM' TERM
trap 'forward INT' INT
# not exec: this shell stays to pass the signals on. torchrun gets a session of its own (setsid) and dies with this
# shell (PR_SET_PDEATHSIG, which execvp keeps); $! is its pid.
python -c 'import ctypes, os, signal, sys
os.setsid()
ctypes.CDLL(None).prctl(1, signal.SIGKILL)
os.execvp(sys.argv[1], sys.argv[1:])' python -m torch.distributed.run --standalone --nproc_per_node "$gpus" \
    -m "src.$method.train" ${limit:+--time-limit "$limit"} "$@" &
launcher=$!
# wait returns early when a trapped signal arrives: keep waiting while torchrun runs (it ends after its processes)
while true; do
    wait "$launcher"
    status=$?
    kill -0 "$launcher" 2>/dev/null || break
done
if [ -f "$STOPPED_FILE" ]; then
    rm -f "$STOPPED_FILE"
    echo "stopped${signalled:+ by SIG$signalled}, state saved: exit 99 (SGE requeues the job; it resumes by itself)"
    exit 99
fi
[ -n "$signalled" ] && echo "received SIG$signalled, but the run did not stop to be resumed (see its log): exit $status"
exit "$status"

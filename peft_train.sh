#!/bin/bash
# LoRA (r=8, alpha=32, query/value) on BLIP-large on VizWiz-Captions, one GPU.
#   qsub peft_train.sh [flags for src.peft.train]      e.g.  qsub peft_train.sh --epochs 5 --lr 2e-4
#   bash peft_train.sh [flags]                       (a workstation: the #$ lines are comments)
# Pass your Hugging Face token from the environment if you need one: qsub -v HF_TOKEN peft_train.sh
# Resource names (-l gpu=1, -pe smp) differ between clusters: check `qconf -sc` / your site's docs.
#
# Preemption and time limits: with -notify, SGE sends SIGUSR1 before suspending and SIGUSR2 before
# killing the job, to the job's whole process group (SIGTERM/SIGINT work too, to the group or to python alone).
# The run finishes its step (or stops between validation batches; a validation being scored is completed), saves
# its full state in <output-dir>/state and exits with status 99, which tells SGE to requeue the job. DataLoader
# workers and the Java scorers ignore those signals and live on until the run ends them. The requeued job reruns
# this same command line and resumes the run by itself, --fresh included: --fresh starts over only at a job's first
# start (the run records the JOB_ID that began it). To start over, submit a new job with --fresh (qsub peft_train.sh
# --fresh ...), or use another --output-dir. A second run in the same --output-dir is refused (its .lock).
# Run-time limit: the job passes its own h_rt (as qstat shows it, so `qsub -l h_rt=...` counts too; else
# TIME_LIMIT below) to --time-limit: the run saves its state and exits with 99 before h_rt, while a step or a
# validation and one more save still fit (measured as it goes). Keep TIME_LIMIT equal to the h_rt line.
# Exit status 3: the loss went NaN/inf several steps in a row (lower --lr); 2: bad input (see the log).
# Device and checkpoints (scripts/job_env.sh): a job that asked for a GPU (-l gpu=1 below) and whose torch sees
# none (a CPU-only torch build, or a driver problem) stops at its start with one line and status 2 instead of
# training on the CPU; --allow-cpu runs it there. The checkpoints come from the Hugging Face cache that
# `python scripts/get_data.py --checkpoints` filled on the login node (HF_HOME), offline when they are there.
#$ -N blip_peft
#$ -cwd
#$ -j y
#$ -o logs/$JOB_NAME.$JOB_ID.log
#$ -l gpu=1
#$ -pe smp 8
#$ -notify
#$ -l h_rt=24:00:00
TIME_LIMIT=24:00:00
set -uo pipefail
# under SGE $0 is a spooled copy of this script: the repository is the directory qsub ran in
cd "${SGE_O_WORKDIR:-$(dirname "$0")}" && source scripts/job_env.sh || exit 2
# exec: python replaces the shell, so it receives the SGE signals itself and its exit status is the job's
limit=$(job_time_limit "$TIME_LIMIT")  # empty outside SGE: no limit
exec python -m src.peft.train ${limit:+--time-limit "$limit"} "$@"

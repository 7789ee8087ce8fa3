#!/bin/bash
# LoRA (r=8, alpha=32, query/value) on BLIP-large on VizWiz-Captions, one GPU.
#   qsub peft_train.sh [flags for src.peft.train]      e.g.  qsub peft_train.sh --epochs 5 --lr 2e-4
#   bash peft_train.sh [flags]                       (a workstation: the #$ lines are comments)
# Pass your Hugging Face token from the environment if you need one: qsub -v HF_TOKEN peft_train.sh
# Resource names (-l gpu=1, -pe smp) differ between clusters: check `qconf -sc` / your site's docs.
#$ -N blip_peft
#$ -cwd
#$ -j y
#$ -o logs/$JOB_NAME.$JOB_ID.log
#$ -l gpu=1
#$ -pe smp 8
#$ -l h_rt=24:00:00
#$ -notify
set -uo pipefail
# under SGE $0 is a spooled copy of this script: the repository is the directory qsub ran in
cd "${SGE_O_WORKDIR:-$(dirname "$0")}" && source scripts/job_env.sh || exit 2
python -m src.peft.train "$@"

#!/bin/bash
# Caption the test split with a run's best model and write <output-dir>/test_captions.json.
#   qsub test.sh ft   --output-dir results/ft            (or: peft; add --split val to score val)
#   bash test.sh peft --output-dir results/peft
# Device and checkpoints (scripts/job_env.sh): a job that asked for a GPU (-l gpu=1 below) and whose torch sees
# none (a CPU-only torch build, or a driver problem) stops at its start with one line and status 2 instead of
# captioning on the CPU; --allow-cpu runs it there. A LoRA run's base checkpoint comes from the Hugging Face cache
# that `python scripts/get_data.py --checkpoints` filled on the login node (HF_HOME), offline when it is there.
#$ -N blip_test
#$ -cwd
#$ -j y
#$ -o logs/$JOB_NAME.$JOB_ID.log
#$ -l gpu=1
#$ -pe smp 8
#$ -l h_rt=2:00:00
#$ -notify
set -uo pipefail
method="${1:-}"
if [ "$method" != ft ] && [ "$method" != peft ]; then
    echo "usage: test.sh ft|peft [flags for src.<method>.test]" >&2
    exit 2
fi
shift
# under SGE $0 is a spooled copy of this script: the repository is the directory qsub ran in
cd "${SGE_O_WORKDIR:-$(dirname "$0")}" && source scripts/job_env.sh || exit 2
exec python -m "src.$method.test" "$@"

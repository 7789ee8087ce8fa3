#!/bin/bash
# A hyper-parameter sweep as one SGE array job: task i trains configuration i of the sweep file into
# <output_root>/<its run name>/ (python scripts/sweep.py list FILE shows the numbering).
#   python scripts/sweep.py submit sweeps/vizwiz_example.yaml      runs: qsub -t 1-N -N sweep_<name> sweep.sh FILE
#   qsub -t 1-N sweep.sh FILE [-- flags added to every run]        the same by hand, N from `sweep.py list FILE`
#   SGE_TASK_ID=3 bash sweep.sh FILE                               one task on a workstation
#   python scripts/sweep.py local FILE                             every task here, one after another
# Each task asks for what ft_train.sh / peft_train.sh ask for: edit the #$ lines for your cluster
# (`qconf -sc`), or add qsub options: sweep.py submit FILE --qsub "-tc 4 -l h_rt=48:00:00" (-tc: at most
# 4 tasks at a time).
#
# Preemption and time limits: with -notify, SGE sends SIGUSR1 before suspending and SIGUSR2 before
# killing a task (SIGTERM works too); sweep.py passes them to the training process, which finishes its
# step, saves its state in the run's state/ and exits with status 99. The task exits 99 too, so SGE
# requeues that task alone, and the requeued task resumes its run by itself. To resubmit by hand, run the
# same submit command again: finished runs stop at once, the others resume.
# Exit status 3: the loss went NaN/inf several steps in a row (lower the lr); 2: bad input (see the log).
#$ -N blip_sweep
#$ -cwd
#$ -j y
#$ -o logs/$JOB_NAME.$JOB_ID.$TASK_ID.log
#$ -l gpu=1
#$ -pe smp 8
#$ -l h_rt=24:00:00
#$ -notify
set -uo pipefail
# under SGE $0 is a spooled copy of this script: the repository is the directory qsub ran in
cd "${SGE_O_WORKDIR:-$(dirname "$0")}" && source scripts/job_env.sh || exit 2
# exec: python replaces the shell, so it receives the SGE signals itself and its exit status is the task's
exec python scripts/sweep.py run "$@"

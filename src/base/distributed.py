"""One process or several: the same entry points run under `accelerate launch` or `torchrun`.

Hugging Face accelerate reads the launcher's environment, starts the process group (NCCL on
GPUs, gloo on CPUs) and wraps the model in DistributedDataParallel. Plain `python -m ...` is a
run of one process and needs no launcher. Every process trains on its share of each batch;
only the main process (rank 0) scores, writes files and logs to the run's log file.

A run that was asked to use a GPU stops at its start when torch sees none (check_device), instead of training on
the CPU. `python -m src.base.distributed [training flags]` makes the same check: multi_gpu_train.sh runs it before
it starts torchrun, so that the job ends in one line (exit status 2), not in one error per process.
"""
import argparse
import atexit
import ctypes
import os
import signal
import sys
from contextlib import nullcontext

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from . import constants as C
from .helpers import UserError, exit_on_user_error


def gpu_request():
    """What asked this run for a GPU, in words, or None: CUDA_VISIBLE_DEVICES naming devices (a scheduler or you set
    it; "" and -1 hide them all), or the GPU an SGE job asked for (JOB_GPU_REQUEST: scripts/job_env.sh sets it from
    the job's `qstat -j` resource list)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible not in ("", "-1", "NoDevFiles"):
        return f"CUDA_VISIBLE_DEVICES={visible} asks for a GPU"
    if os.environ.get("JOB_GPU_REQUEST"):
        return f"SGE job {os.environ.get('JOB_ID', '')} asked for a GPU ({os.environ['JOB_GPU_REQUEST']})"
    return None


def check_device(allow_cpu=False):
    """A UserError when this run was asked to use a GPU and torch sees none, unless `allow_cpu` (--allow-cpu) or
    ALLOW_CPU: the job would otherwise train on the CPU, many times slower, with only "cpu" in its log to tell."""
    request = gpu_request()
    if request is None or allow_cpu or C.ALLOW_CPU or torch.cuda.is_available():
        return
    build = torch.version.cuda or torch.version.hip  # None: a CPU-only build
    version = f'torch {torch.__version__} (python -c "import torch; print(torch.version.cuda)": {build})'
    if build:
        problem = f"{version} sees no GPU: check the node's driver (nvidia-smi) and the GPUs the job was given"
    else:
        again = f"remove the environment {sys.prefix} and " if sys.prefix != sys.base_prefix else ""
        problem = (f"{version} is a CPU-only build: on a login node, {again}source scripts/setup_env.sh (without "
                   f"TORCH_SPEC=cpu) to install the CUDA build")
    raise UserError(f"{request}, but {problem}; or pass --allow-cpu (or set ALLOW_CPU=1) to run on the CPU")


class Processes:
    """This process's place among the run's processes, and the few collective operations the engine needs."""

    def __init__(self):
        if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun (or accelerate launch)
            die_with_launcher()
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        if self.world > 1:
            # Left to the interpreter's teardown, the process group's threads can abort a process that has
            # finished its work ("terminate called without an active exception", exit -6): end it first.
            atexit.register(self.accelerator.end_training)

    def wrap(self, module):
        """DistributedDataParallel around `module` when there are several processes (gradients are averaged)."""
        return self.accelerator.prepare_model(module, device_placement=False) if self.world > 1 else module

    def no_sync(self, module, skip):
        """Inside this, backward accumulates local gradients without the all-reduce (all but the last micro-batch)."""
        return self.accelerator.no_sync(module) if skip and self.world > 1 else nullcontext()

    def sum(self, values):
        """Element-wise sum of a list of numbers over all processes (the list itself with one process)."""
        if self.world == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, items):
        """Concatenate each process's list `items`, in rank order, on every process."""
        return gather_object(items) if self.world > 1 else list(items)

    def wait(self):
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def shard(self, items):
        """This process's share of a list: every world-th item, from its rank."""
        return items[self.rank::self.world]


def main_process():
    """Whether this is rank 0, before a Trainer exists (logging setup). torchrun and accelerate set RANK."""
    return int(os.environ.get("RANK", "0")) == 0


def die_with_launcher():
    """End this process when its launcher dies. torchrun starts each training process in a session of its own, out
    of reach of the signals the scheduler sends the job's process group, so when the job is killed (SIGKILL) with
    torchrun, its training processes would otherwise go on training, unseen, in the run directory."""
    if not sys.platform.startswith("linux"):
        return
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@exit_on_user_error
def main(argv=None):
    """check_device for a job's training flags (--allow-cpu among them); status 0 when the run may start."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--allow-cpu", action="store_true")
    check_device(parser.parse_known_args(argv)[0].allow_cpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One process or several: the same entry points run under `accelerate launch` or `torchrun`.

Hugging Face accelerate reads the launcher's environment, starts the process group (NCCL on
GPUs, gloo on CPUs) and wraps the model in DistributedDataParallel. Plain `python -m ...` is a
run of one process and needs no launcher. Every process trains on its share of each batch;
only the main process (rank 0) scores, writes files and logs to the run's log file.
"""
import atexit
import ctypes
import os
import signal
import sys
from contextlib import nullcontext

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object


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

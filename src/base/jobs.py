"""What a batch scheduler does to a run, and how the run survives it.

SGE's -notify sends SIGUSR1 (suspend coming) and SIGUSR2 (kill coming) to the job's whole process group;
`timeout`, Slurm and Kubernetes send SIGTERM to every process of the job. A job that exits with status 99 is
requeued: SGE reruns the identical command line, with the same JOB_ID. So:
- the main process turns those signals into a flag (`StopSignals`): it finishes its step, saves, exits 99;
- the processes it starts must not die of them: DataLoader workers ignore them (`ignore_stop_signals`, their
  worker_init_fn) and Java children (PTB tokenizer, METEOR, SPICE) run in a session of their own
  (`children_in_own_session`), where the group's signals do not reach;
- a requeued job resumes the run its first start began, even if its command line says --fresh (`current_job`);
- one run directory has one writer at a time (`RunLock`).
"""
import atexit
import errno
import fcntl
import json
import multiprocessing
import multiprocessing.util  # registers its exit handler now, so _kill_daemon_workers' runs first
import os
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from .helpers import UserError, log

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
LOCK_FILE = ".lock"


class StopSignals:
    """Turn SIGUSR1/SIGUSR2 (SGE -notify: suspend/kill coming), SIGTERM and SIGINT into a flag.

    The loop checks the flag after each step and between validation batches, saves the state
    and exits with EXIT_STOPPED. A second Ctrl-C stops at once.
    """

    def __init__(self):
        self.received = None
        self.depth = 0  # entered by the entry point, then by the Trainer: the handlers go at the outer exit

    def __enter__(self):
        if self.depth == 0:
            self.previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        self.depth += 1
        return self

    def __exit__(self, *exc):
        self.depth -= 1
        if self.depth == 0:
            for s, handler in self.previous.items():
                signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name


def ignore_stop_signals(*_):
    """In a DataLoader worker (its worker_init_fn): leave the stop signals to the main process, which saves and
    then ends the workers itself. torch's own SIGTERM handler in workers would otherwise kill them, and the main
    process would fail with "DataLoader worker ... is killed by signal: Terminated". Under the forkserver and spawn
    start methods workers inherit no handlers at all: this covers them too."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def _kill_daemon_workers():
    """At exit: kill the DataLoader workers still running. They ignore the stop signals (ignore_stop_signals), and an
    error that escapes a run leaves its loaders (their workers persist between epochs) referenced by the traceback;
    multiprocessing's own exit handler ends daemon children with SIGTERM, which they ignore, then waits for them
    forever: the job would hang until the scheduler's time limit. They hold nothing to save."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join()


atexit.register(_kill_daemon_workers)  # after multiprocessing.util's (imported above): exit handlers run last first


@contextmanager
def children_in_own_session():
    """Every process started inside this (by pycocoevalcap: METEOR, SPICE) gets a session of its own, so that the
    signals sent to the job's process group do not kill it in the middle of scoring; the run decides when to stop."""
    original = subprocess.Popen

    class OwnSessionPopen(original):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("start_new_session", True)
            super().__init__(*args, **kwargs)

    subprocess.Popen = OwnSessionPopen
    try:
        yield
    finally:
        subprocess.Popen = original


def current_job():
    """This batch job's identity, the same across its requeues: SGE's JOB_ID (and SGE_TASK_ID in an array job);
    None outside a scheduler."""
    job, task = os.environ.get("JOB_ID"), os.environ.get("SGE_TASK_ID")
    if not job:
        return None
    return f"{job}.{task}" if task and task != "undefined" else job


def is_requeue_of(started_by):
    """Whether this job is a requeue (or restart) of the job that started a run (`started_by`: its current_job()).
    SGE keeps JOB_ID across requeues and sets RESTARTED=1 in a rerun (0 at the first start)."""
    return started_by is not None and started_by == current_job() and os.environ.get("RESTARTED", "1") != "0"


class RunLock:
    """An exclusive lock on a run directory, held for the life of the process that trains in it (the kernel
    releases it when the process ends, however it ends). A second run in the same directory is refused in one line;
    a requeued job whose previous start is still finishing its save (the same job) waits for it."""

    def __init__(self, output_dir, wait_for_same_job=120.0):
        self.path = Path(output_dir) / LOCK_FILE
        self.wait_for_same_job = wait_for_same_job
        self.file = None

    def acquire(self):
        self.file = open(self.path, "a+")
        deadline, waiting = time.time() + self.wait_for_same_job, False
        while not self._try_lock():
            holder = self._holder()
            if holder.get("job") is None or holder.get("job") != current_job() or time.time() > deadline:
                self.file.close()
                raise UserError(f"{self.path.parent}: another run is writing here ({self._describe(holder)}); wait "
                                f"for it to end, stop it, or use another --output-dir")
            if not waiting:
                log.info(f"waiting for the previous start of job {current_job()} to finish in {self.path.parent} "
                         f"({self._describe(holder)})")
                waiting = True
            time.sleep(1.0)
        self.file.seek(0)
        self.file.truncate()
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "job": current_job(),
                   "since": time.strftime("%Y-%m-%d %H:%M:%S")}, self.file)
        self.file.flush()
        return self

    def release(self):
        if self.file is not None:
            self.file.close()  # closing the file releases the lock
            self.file = None

    def _try_lock(self):
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as error:
            if error.errno in (errno.EAGAIN, errno.EACCES):
                return False
            # a file system without locks (some Lustre mounts): go on, as before locking existed
            log.warning(f"cannot lock {self.path} ({error.strerror}): make sure no other run writes here")
            return True

    def _holder(self):
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _describe(holder):
        if not holder:
            return "holder unknown"
        job = f", job {holder['job']}" if holder.get("job") else ""
        return f"process {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('since')}"

"""Small shared pieces: user errors, logging, seeding, atomic writes."""
import functools
import json
import logging
import os
import random
import shutil
import sys
from pathlib import Path

import torch

log = logging.getLogger("vizwiz")


class UserError(Exception):
    """A problem with the user's input (file, flag, directory): reported in one line, exit status 2."""


def exit_on_user_error(main):
    """Decorator for entry points: a UserError becomes one line on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def setup_logging(log_file=None, quiet=False):
    """Log to the console and, when given, to `log_file` (appending, so resumed runs keep one log). `quiet`: the
    console gets warnings only (the other processes of a multi-process run: rank 0 says the rest once)."""
    log.setLevel(logging.INFO)
    log.handlers.clear()
    log.propagate = False
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(log_file)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(to_file)


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def process_seed(seed, rank):
    """The seed of process `rank` of a run: `seed` itself for rank 0, so that a one-process run is unchanged, and
    one derived from both for the others, so that each process draws its own dropout masks and SCST samples."""
    return seed if rank == 0 else (seed * 1_000_003 + rank) % 2**63


def rng_state():
    """This process's random-number-generator states training draws from (dropout, SCST samples), as tensors safe
    to save and reload.

    Data order does not come from here: each epoch's order is derived from (seed, epoch) alone.
    """
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def write_json_atomic(path, obj):
    """Write JSON to a temporary name, then rename into place: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replace_dir_atomic(tmp_dir, final_dir):
    """Move a fully written `tmp_dir` to `final_dir`, keeping the old `final_dir` until the new one is in place.

    A kill at any instant leaves either the old or the new directory complete: the old one is
    renamed to `<final>.old` first and removed only after the new one has its final name;
    `recover_dir` puts it back if we die in between.
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    old_dir = final_dir.with_name(final_dir.name + ".old")
    if old_dir.exists():
        shutil.rmtree(old_dir)
    if final_dir.exists():
        os.replace(final_dir, old_dir)
    os.replace(tmp_dir, final_dir)
    if old_dir.exists():
        shutil.rmtree(old_dir)


def recover_dir(final_dir):
    """Undo an interrupted `replace_dir_atomic`: restore `<final>.old` if `final` is missing."""
    final_dir = Path(final_dir)
    old_dir = final_dir.with_name(final_dir.name + ".old")
    if not final_dir.exists() and old_dir.exists():
        os.replace(old_dir, final_dir)
    return final_dir


def fsync_dir(directory):
    """Flush every file in `directory` to disk before it is renamed into place."""
    for path in Path(directory).rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())

"""The Hugging Face cache: `scripts/get_data.py --checkpoints` fills it on a login node, the jobs load from it.

    python -m src.base.hub [the job's flags]       # what scripts/job_env.sh evaluates

prints `export HF_HOME=...` (HF_HOME in src/base/constants.py) and, when the cache holds the checkpoints the job
starts from, `export HF_HUB_OFFLINE=1`: a compute node without internet then loads them from the cache at once,
instead of asking the hub first (half a minute of retries, then a failure). The checkpoints a job starts from are
the hub name given with --checkpoint, else HUB_CHECKPOINTS: the defaults get_data.py --checkpoints fetches, which a
LoRA adapter's base checkpoint usually is. An HF_HUB_OFFLINE you set yourself is left as it is. No torch here: this
runs in a fraction of a second.
"""
import argparse
import os
import shlex
import sys
from pathlib import Path

from . import constants as C  # first: it exports HF_HOME, which huggingface_hub reads when it is imported
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.utils import HFValidationError, validate_repo_id

# a checkpoint's weights, one of these (get_data.py fetches safetensors where the repository has them)
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def is_hub_name(checkpoint):
    """Whether a --checkpoint names a hub repository: shaped like one (name or owner/name), and not a local path."""
    try:
        validate_repo_id(checkpoint)
    except HFValidationError:
        return False
    return not Path(checkpoint).exists()


def cache_dir():
    """Where huggingface_hub keeps checkpoints: HF_HUB_CACHE if set, else <HF_HOME>/hub."""
    return Path(os.environ.get("HF_HUB_CACHE") or Path(C.HF_HOME) / "hub").expanduser()


def in_cache(name):
    """Whether the cache holds hub checkpoint `name`'s configuration and weights, as get_data.py leaves them."""
    def cached(file):
        return isinstance(try_to_load_from_cache(name, file, cache_dir=cache_dir()), str)
    return cached("config.json") and any(cached(file) for file in WEIGHTS)


def fetch_command(name):
    return f"python scripts/get_data.py --checkpoints {name}"


def job_environment(argv):
    """The shell lines scripts/job_env.sh evaluates for a job run with the flags `argv`."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--checkpoint")
    given = parser.parse_known_args(argv)[0].checkpoint
    if given and is_hub_name(given):
        names = [given]
    else:
        names = [name.strip() for name in C.HUB_CHECKPOINTS.split(",") if name.strip()]
    lines = [f"export HF_HOME={shlex.quote(C.HF_HOME)}"]
    if "HF_HUB_OFFLINE" not in os.environ and names and all(in_cache(name) for name in names):
        lines.append("export HF_HUB_OFFLINE=1")
    return lines


if __name__ == "__main__":
    print("\n".join(job_environment(sys.argv[1:])))

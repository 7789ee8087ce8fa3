"""Shared fixtures: tiny BLIP, GIT and BLIP-2 checkpoints and small VizWiz-format data sets, made offline, once per session."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "vizwiz_sample"  # 15 real VizWiz val photos (CC-BY 4.0, Gurari et al. 2020)
sys.path.insert(0, str(REPO))

from scripts.make_demo_assets import make_dataset, make_tiny_blip, make_tiny_blip2, make_tiny_git  # noqa: E402

# Settings for quick CPU runs of the real entry points on the tiny model.
FAST = ["--batch-size", "8", "--num-workers", "0", "--num-beams", "1", "--min-new-tokens", "0",
        "--max-new-tokens", "20", "--eval-batch-size", "32"]


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory):
    return make_tiny_blip(tmp_path_factory.mktemp("assets") / "tiny-blip")


@pytest.fixture(scope="session")
def tiny_git(tmp_path_factory):
    return make_tiny_git(tmp_path_factory.mktemp("assets") / "tiny-git")


@pytest.fixture(scope="session")
def tiny_blip2(tmp_path_factory):
    return make_tiny_blip2(tmp_path_factory.mktemp("assets") / "tiny-blip2")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("assets") / "vizwiz", train=240, val=40, test=25, seed=1)


@pytest.fixture(scope="session")
def ft_run(tmp_path_factory, tiny_blip, demo_data):
    """Full fine-tuning of the tiny BLIP on the demo set, 300 steps (validation CIDEr-D about 2.0-2.6)."""
    out = tmp_path_factory.mktemp("runs") / "ft"
    run_module("src.ft.train", "--data-dir", demo_data, "--checkpoint", tiny_blip, "--output-dir", out, *FAST,
               "--lr", "1e-3", "--eval-every", "50", "--max-steps", "300")
    return out


def run_module(module, *args, check=True, env=None):
    """`python -m module args...` from the repo root, offline; returns the CompletedProcess."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=full_env,
                            capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{module} exited {result.returncode}\nstdout:\n{result.stdout[-3000:]}\n"
                             f"stderr:\n{result.stderr[-3000:]}")
    return result


def read_metrics(output_dir):
    with open(Path(output_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def write_annotations(path, images, annotations=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {"images": images}
    if annotations is not None:
        content["annotations"] = annotations
    path.write_text(json.dumps(content))
    return path

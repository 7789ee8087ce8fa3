"""Several processes through torchrun (gloo on the CPU): the same gradient as one process, one writer."""
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import FAST, REPO, read_metrics, run_module

STEPS = ["--lr", "1e-3", "--max-steps", "8", "--eval-every", "4", "--val-max-images", "16", "--seed", "3"]


def torchrun(module, *args, processes=2):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", module, *map(str, args)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("method", ["ft"])
def test_two_processes_train_like_one(tmp_path, tiny_blip, demo_data, method):
    args = ["--data-dir", demo_data, "--checkpoint", tiny_blip, *FAST, *STEPS]
    run_module(f"src.{method}.train", *args, "--output-dir", tmp_path / "one")
    torchrun(f"src.{method}.train", *args, "--output-dir", tmp_path / "two")

    one, two = (load_file(tmp_path / run / "state" / "trainable.safetensors") for run in ("one", "two"))
    assert one.keys() == two.keys()
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst < 1e-4, worst  # the 8 batch gradients agree to float rounding: a DDP mean of local means would not
    m_one, m_two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [m["step"] for m in m_two] == [4, 8]
    assert [m["num_processes"] for m in m_two] == [2, 2]
    assert [m["captions_seen"] for m in m_two] == [m["captions_seen"] for m in m_one]  # counted over both processes
    for a, b in zip(m_one, m_two):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["CIDEr"] == pytest.approx(a["CIDEr"], abs=1e-6)  # captions gathered from both processes
    # one writer: one log, one line per validation
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 2
    assert not list((tmp_path / "two").glob(".write-test*"))


def test_two_processes_caption_the_test_set_once(tmp_path, tiny_blip, demo_data):
    out = tmp_path / "run"
    run_module("src.ft.test", "--checkpoint", tiny_blip, "--data-dir", demo_data, "--output-dir", out / "one", *FAST)
    torchrun("src.ft.test", "--checkpoint", tiny_blip, "--data-dir", demo_data, "--output-dir", out / "two", *FAST)
    one = (out / "one" / "test_captions.json").read_text()
    assert (out / "two" / "test_captions.json").read_text() == one

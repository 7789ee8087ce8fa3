"""Several processes through torchrun (gloo on the CPU): the same gradient as one process, one writer."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from conftest import FAST, REPO, read_metrics, run_module

STEPS = ["--lr", "1e-3", "--max-steps", "20", "--eval-every", "5", "--val-max-images", "16", "--seed", "3"]


def torchrun(module, *args, processes=2):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", module, *map(str, args)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_processes_train_like_one_and_survive_an_sge_signal(tmp_path, tiny_blip, demo_data):
    """multi_gpu_train.sh with 2 processes (gloo), stopped by SIGUSR1 as SGE's -notify sends it, then resubmitted."""
    args = ["--data-dir", demo_data, "--checkpoint", tiny_blip, *FAST, *STEPS]
    run_module("src.ft.train", *args, "--output-dir", tmp_path / "one")

    two = tmp_path / "two"
    env = {**os.environ, "VENV_DIR": sys.prefix, "NGPUS": "2", "HF_HUB_OFFLINE": "1"}
    wrapper = ["bash", "multi_gpu_train.sh", "ft", *map(str, args), "--output-dir", str(two)]
    job = subprocess.Popen(wrapper, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (two / "metrics.jsonl").is_file() and job.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    job.send_signal(signal.SIGUSR1)
    output = job.communicate(timeout=300)[0]
    assert job.returncode == 99, output[-3000:]
    stopped_at = json.loads((two / "state" / "progress.json").read_text())["step"]
    assert 5 <= stopped_at < 20, output[-3000:]

    rerun = subprocess.run(wrapper, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    one, two_weights = (load_file(run / "state" / "trainable.safetensors") for run in (tmp_path / "one", two))
    assert one.keys() == two_weights.keys()
    worst = max((one[k] - two_weights[k]).abs().max().item() for k in one)
    assert worst < 1e-4, worst  # same batches, same gradients: a DDP mean of per-process means would drift
    m_one, m_two = read_metrics(tmp_path / "one"), read_metrics(two)
    assert [m["step"] for m in m_two] == [5, 10, 15, 20]
    assert {m["num_processes"] for m in m_two} == {2}
    assert [m["captions_seen"] for m in m_two] == [m["captions_seen"] for m in m_one]  # counted over both processes
    for a, b in zip(m_one, m_two):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["CIDEr"] == pytest.approx(a["CIDEr"], abs=1e-6)  # captions gathered from both processes
    assert "resumed from" in (two / "train.log").read_text()
    assert not list(two.glob(".write-test*"))


def test_two_processes_caption_the_test_set_once(tmp_path, tiny_blip, demo_data):
    out = tmp_path / "run"
    run_module("src.ft.test", "--checkpoint", tiny_blip, "--data-dir", demo_data, "--output-dir", out / "one", *FAST)
    torchrun("src.ft.test", "--checkpoint", tiny_blip, "--data-dir", demo_data, "--output-dir", out / "two", *FAST)
    one = (out / "one" / "test_captions.json").read_text()
    assert (out / "two" / "test_captions.json").read_text() == one

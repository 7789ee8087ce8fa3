"""Several processes through torchrun (gloo on the CPU): the same gradient as one process, one writer."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST, REPO, read_metrics, run_module
from src.base.helpers import process_seed

# without the step-0 validation (test_pipeline covers it): the first metrics line is then the first trained one
STEPS = ["--lr", "1e-3", "--max-steps", "20", "--eval-every", "5", "--val-max-images", "16", "--seed", "3",
         "--no-eval-at-start"]
# LoRA with dropout, one image per step: on 2 processes, process 1 trains on a stand-in with zero weight
ONE_IMAGE_WITH_DROPOUT = ["--batch-size", "1", "--lora-dropout", "0.1", "--lr", "1e-3", "--max-steps", "12",
                          "--eval-every", "4", "--val-max-images", "4", "--seed", "3", "--no-eval-at-start"]
TIMINGS = {"elapsed_seconds", "train_captions_per_second", "val_seconds", "peak_memory_gb", "device_hours",
           "num_processes"}


def torchrun(module, *args, processes=2):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", module, *map(str, args)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def multi_gpu_train(method, *args, processes=2):
    """multi_gpu_train.sh as SGE runs a job: in a process group of its own; started, not waited for."""
    env = {**os.environ, "VENV_DIR": sys.prefix, "NGPUS": str(processes), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(["bash", "multi_gpu_train.sh", method, *map(str, args)], cwd=REPO, env=env,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def notify_and_end_the_job(job, output_dir, when):
    """SGE's -notify: SIGUSR1 to the job's whole process group once `when()` is true; then, once the job script has
    exited, SIGKILL to what is left of the group, as SGE does. No training process may be left (they run in
    sessions of their own, out of the group's reach). Returns the job's output."""
    deadline = time.time() + 300
    while not when() and job.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(job.pid, signal.SIGUSR1)
    try:
        output = job.communicate(timeout=300)[0]
    except subprocess.TimeoutExpired:
        tree = subprocess.run(["ps", "-eo", "pid,ppid,pgid,sid,stat,args", "--forest"], capture_output=True, text=True)
        os.killpg(job.pid, signal.SIGKILL)
        raise AssertionError(f"the job did not end after the signal:\n{tree.stdout[-4000:]}")
    try:
        os.killpg(job.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    time.sleep(1)
    assert left_running(output_dir) == [], output[-3000:]
    return output


def left_running(output_dir):
    """Live processes whose command line names `output_dir` (the run's training processes)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if entry.name.isdigit() and str(output_dir) in command and "Z" != (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]:
                found.append(command)
        except (OSError, IndexError):
            pass
    return found


def saved_rng_states(output_dir):
    return torch.load(output_dir / "state" / "optimizer.pt", weights_only=True)["rng"]


def comparable_metrics(output_dir):
    return [{k: v for k, v in line.items() if k not in TIMINGS} for line in read_metrics(output_dir)]


def test_each_process_has_a_seed_of_its_own_and_rank_0_that_of_a_one_process_run():
    seeds = [process_seed(42, rank) for rank in range(8)]
    assert seeds[0] == 42 and len(set(seeds)) == 8
    assert process_seed(43, 1) != seeds[1] and process_seed(42, 1) == seeds[1]


def test_a_batch_smaller_than_the_processes_trains_like_one_and_each_process_resumes_its_dropout(tmp_path, tiny_blip,
                                                                                                demo_data):
    """One image per step on 2 processes: process 0 trains on it exactly as one process would (same seed, same
    dropout masks), process 1 on a stand-in with zero weight, so weights and metrics match one process bit for bit
    and no image is counted twice. Stopped by SIGUSR1 and resubmitted, the run replays every process's random
    numbers: its weights, metrics and final random-number states are those of an uninterrupted run."""
    args = ["--data-dir", demo_data, "--checkpoint", tiny_blip, *FAST, *ONE_IMAGE_WITH_DROPOUT]
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    run_module("src.peft.train", *args, "--output-dir", one, env={"OMP_NUM_THREADS": "1"},  # as torchrun sets it
               subprocess=True)
    torchrun("src.peft.train", *args, "--output-dir", two)

    job = multi_gpu_train("peft", *args, "--output-dir", resumed)
    output = notify_and_end_the_job(job, resumed, when=(resumed / "metrics.jsonl").is_file)
    assert job.returncode == 99, output[-3000:]
    stopped_at = json.loads((resumed / "state" / "progress.json").read_text())["step"]
    assert 4 <= stopped_at < 12, output[-3000:]
    rerun = multi_gpu_train("peft", *args, "--output-dir", resumed)
    output = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0 and "resumed from" in output, output[-3000:]

    w_one, w_two, w_resumed = (load_file(run / "state" / "trainable.safetensors") for run in (one, two, resumed))
    assert w_one.keys() == w_two.keys() == w_resumed.keys()
    assert all(torch.equal(w_one[k], w_two[k]) for k in w_one)
    assert all(torch.equal(w_two[k], w_resumed[k]) for k in w_two)
    assert comparable_metrics(one) == comparable_metrics(two) == comparable_metrics(resumed)
    assert read_metrics(two)[-1]["images_seen"] == 12  # not 24: the stand-ins are not counted

    rng_two, rng_resumed = saved_rng_states(two), saved_rng_states(resumed)
    assert len(rng_two) == len(rng_resumed) == 2
    assert not torch.equal(rng_two[0]["torch"], rng_two[1]["torch"])  # each process its own dropout masks
    for state, replayed in zip(rng_two, rng_resumed):
        assert torch.equal(state["torch"], replayed["torch"])


# SCST under torchrun, recording every sampled caption's reward on each process
RECORD_REWARDS = r"""
import json, os, sys
sys.path.insert(0, os.getcwd())
from src.base import objectives
from src.base.main import train_main
from src.ft.method import METHOD

reward = objectives.SelfCritical.rewards

def recorded(self, image_ids, sequences, *prefix_lengths):
    scores = reward(self, image_ids, sequences, *prefix_lengths)
    with open(os.path.join(sys.argv[1], f"rewards-{os.environ['RANK']}.json"), "a") as f:
        f.write(json.dumps(scores.tolist()) + "\n")
    return scores

objectives.SelfCritical.rewards = recorded
raise SystemExit(train_main(METHOD, sys.argv[2:]))
"""


def test_scst_train_reward_is_the_mean_over_all_processes(tmp_path, tiny_blip, demo_data):
    script, out = tmp_path / "record_rewards.py", tmp_path / "run"
    script.write_text(RECORD_REWARDS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               str(tmp_path), "--data-dir", str(demo_data), "--checkpoint", str(tiny_blip), "--output-dir", str(out),
               *FAST, "--objective", "scst", "--scst-samples", "3", "--batch-size", "6", "--max-steps", "2",
               "--eval-every", "2", "--val-max-images", "2", "--lr", "1e-4"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    per_rank = [[r for line in (tmp_path / f"rewards-{rank}.json").read_text().splitlines() for r in json.loads(line)]
                for rank in (0, 1)]
    assert [len(rewards) for rewards in per_rank] == [2 * 3 * 3, 2 * 3 * 3]  # 2 steps x 3 images x 3 samples each
    everything = per_rank[0] + per_rank[1]
    mean_of_all, mean_of_rank_0 = sum(everything) / len(everything), sum(per_rank[0]) / len(per_rank[0])
    assert abs(mean_of_all - mean_of_rank_0) > 1e-3  # the processes' rewards differ: the check can fail
    assert read_metrics(out)[-1]["train_reward"] == pytest.approx(mean_of_all, rel=1e-9)


def test_two_processes_train_like_one_and_stop_together_mid_validation(tmp_path, tiny_blip, demo_data):
    """multi_gpu_train.sh with 2 processes (gloo). SGE's notify signal reaches the job's process group while the
    processes caption the first validation (20 batches each): they stop at the same batch, save the state with the
    validation still to do, and the job exits 99 once both have exited; the group is then killed as SGE does, and
    nothing is left running. The requeued job (the same command line) trains on as one process would have."""
    args = ["--data-dir", demo_data, "--checkpoint", tiny_blip, *FAST, *STEPS, "--val-max-images", "40",
            "--eval-batch-size", "1"]
    run_module("src.ft.train", *args, "--output-dir", tmp_path / "one")

    two = tmp_path / "two"
    job = multi_gpu_train("ft", *args, "--output-dir", two)
    seen = []  # the job's output so far, read as it comes
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: job.stdout.read(1), "")), daemon=True)
    reader.start()
    job.communicate = lambda timeout: (job.wait(timeout), reader.join(timeout), ("".join(seen), None))[-1]
    output = notify_and_end_the_job(job, two, when=lambda: "step 5: validating on " in "".join(seen))
    assert job.returncode == 99, output[-3000:]
    assert "stopped by SIGUSR1, state saved: exit 99" in output
    state = json.loads((two / "state" / "progress.json").read_text())
    assert state["step"] == 5 and state["eval_pending"], output[-3000:]  # stopped inside the validation of step 5
    assert not (two / "metrics.jsonl").exists()

    rerun = multi_gpu_train("ft", *args, "--output-dir", two)
    output = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, output[-3000:]
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


def test_a_job_killed_outright_leaves_no_training_process(tmp_path, tiny_blip, demo_data):
    """SIGKILL to the job's process group (qdel, or h_rt without -notify) kills the job script at once: torchrun dies
    with it, and the training processes, which torchrun starts in sessions of their own, die with torchrun."""
    out = tmp_path / "run"
    job = multi_gpu_train("ft", "--data-dir", demo_data, "--checkpoint", tiny_blip, *FAST, *STEPS, "--max-steps", "500",
                          "--output-dir", out)
    deadline = time.time() + 300
    while not (out / "state" / "progress.json").is_file() and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert len(left_running(out)) >= 2  # both training processes (and torchrun) are running
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    deadline = time.time() + 20
    while left_running(out) and time.time() < deadline:
        time.sleep(0.1)
    assert left_running(out) == []

"""Runs under the real scheduler's rules (src/base/jobs.py).

SGE's -notify sends SIGUSR1/SIGUSR2 to the job's whole process group (`timeout`, Slurm and Kubernetes send SIGTERM
to every process), kills what is left of the group once the job script exits, and reruns a requeued job's identical
command line with the same JOB_ID and RESTARTED=1. The runs here are started in a session of their own and signalled
with os.killpg, as the scheduler does, at the moment that matters.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, comparable_metrics, read_metrics, resume_argv, run_module, same_weights
from src.base.engine import EXIT_STOPPED
from src.base.jobs import RunLock, children_in_own_session


def start_job(command, env=None):
    """A job as the scheduler starts it: in a process group (and session) of its own, output collected."""
    return subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})})


def children(pid):
    """{pid: command line} of the processes whose parent is `pid`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if parent == pid:
                    found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, IndexError, ValueError):
                pass
    return found


def processes_running(text):
    """Command lines of the live processes (not zombies) that contain `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                if text in command and state != "Z":
                    found.append(command)
            except (OSError, IndexError):
                pass
    return found


def wait_until(condition, what, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def state_step(out):
    try:
        return json.loads((Path(out) / "state" / "progress.json").read_text())["step"]
    except (OSError, ValueError):
        return -1


# ---------------------------------------------------------------- one process

START_METHOD = ("import multiprocessing, runpy, sys; multiprocessing.set_start_method(sys.argv.pop(1)); "
                "runpy.run_module(sys.argv.pop(1), run_name='__main__')")


@pytest.mark.parametrize("sig, start_method", [(signal.SIGUSR1, "fork"), (signal.SIGTERM, "forkserver")])
def test_a_group_signal_while_java_scores_and_workers_load_saves_and_exits_99(sig, start_method, tmp_path, straight,
                                                                             tiny_blip, demo_data):
    """The whole group is signalled while the PTB tokenizer (Java) scores a validation and two DataLoader workers
    run: Java and the workers live on, the validation completes, the state is saved, the run exits 99; rerun, it
    ends exactly as the uninterrupted run. forkserver (Python 3.14's default) workers inherit no signal handlers."""
    out = tmp_path / "run"
    command = [sys.executable, "-c", START_METHOD, start_method, "src.ft.train",
               *resume_argv(demo_data, tiny_blip, out, "--num-workers", "2")]
    job = start_job(command)
    java = {}
    wait_until(lambda: java.update({p: c for p, c in children(job.pid).items() if "PTBTokenizer" in c}) or java,
               "the PTB tokenizer")
    os.killpg(job.pid, sig)
    output = job.communicate(timeout=180)[0]
    assert job.returncode == EXIT_STOPPED, output[-3000:]
    assert f"received {sig.name}: state saved at step 20" in output
    assert [m["step"] for m in read_metrics(out)] == [20]  # the validation under way was completed and recorded

    rerun = run_module("src.ft.train", *resume_argv(demo_data, tiny_blip, out))
    assert f"resumed from {out / 'state'} at step 20" in rerun.stdout
    assert same_weights(straight["ft"], out)
    assert comparable_metrics(straight["ft"]) == comparable_metrics(out)


def test_java_that_a_library_starts_is_out_of_the_groups_reach():
    """METEOR's Java (pycocoevalcap starts it) runs in a session of its own; outside the context, children are not."""
    from pycocoevalcap.meteor.meteor import Meteor
    with children_in_own_session():
        meteor = Meteor()
        plain = subprocess.Popen(["sleep", "5"])
    try:
        assert os.getsid(meteor.meteor_p.pid) == meteor.meteor_p.pid != os.getsid(0)
        assert os.getsid(plain.pid) == plain.pid
    finally:
        plain.kill()
        meteor.meteor_p.kill()
    later = subprocess.Popen(["sleep", "5"])
    assert os.getsid(later.pid) == os.getsid(0)
    later.kill()


def test_a_requeued_job_resumes_although_its_command_line_says_fresh(tmp_path, straight, tiny_blip, demo_data):
    """qsub ft_train.sh --fresh ...: stopped by SGE's notify signal, the job exits 99 and SGE reruns the same command
    line (same JOB_ID, RESTARTED=1): it resumes. A new job with --fresh starts over."""
    out = tmp_path / "run"
    command = ["bash", "ft_train.sh", "--fresh", *resume_argv(demo_data, tiny_blip, out)]
    env = {"VENV_DIR": sys.prefix, "JOB_ID": "4711", "SGE_TASK_ID": "undefined"}
    job = start_job(command, {**env, "RESTARTED": "0"})
    wait_until(lambda: state_step(out) >= 10, "a saved state")
    os.killpg(job.pid, signal.SIGUSR2)
    output = job.communicate(timeout=180)[0]
    assert job.returncode == EXIT_STOPPED, output[-3000:]
    stopped_at = state_step(out)

    requeued = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, **env, "RESTARTED": "1", "HF_HUB_OFFLINE": "1"})
    assert requeued.returncode == 0, requeued.stdout[-3000:] + requeued.stderr[-3000:]
    assert "job 4711 was requeued: resuming the run it started" in requeued.stdout
    assert f"resumed from {out / 'state'} at step {stopped_at}" in requeued.stdout
    assert same_weights(straight["ft"], out)
    assert comparable_metrics(straight["ft"]) == comparable_metrics(out)

    new_job = start_job(command, {**env, "JOB_ID": "4712", "RESTARTED": "0"})
    wait_until(lambda: not (out / "metrics.jsonl").exists() or new_job.poll() is not None, "the fresh start")
    os.killpg(new_job.pid, signal.SIGUSR1)
    output = new_job.communicate(timeout=180)[0]
    assert new_job.returncode == EXIT_STOPPED and "resuming" not in output and "resumed" not in output, output[-3000:]
    assert state_step(out) < 60 and json.loads((out / "config.json").read_text())["job"] == "4712"


def test_a_second_run_in_the_same_directory_is_refused_in_one_line(tmp_path, tiny_blip, demo_data, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    holder = RunLock(out).acquire()  # another run, writing here
    try:
        result = run_module("src.ft.train", *resume_argv(demo_data, tiny_blip, out), "--fresh", check=False)
    finally:
        holder.release()
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.strip() == (f"error: {out}: another run is writing here (process {os.getpid()} on "
                                     f"{os.uname().nodename}, since {json.loads((out / '.lock').read_text())['since']}); "
                                     f"wait for it to end, stop it, or use another --output-dir")
    assert not (out / "state").exists() and not (out / "config.json").exists()  # --fresh deleted nothing


def test_a_requeued_job_waits_for_its_previous_start_to_release_the_directory(tmp_path, monkeypatch):
    """The same job (its previous start still saving, e.g. on another node) is waited for, not refused."""
    monkeypatch.setenv("JOB_ID", "99")
    first = RunLock(tmp_path).acquire()
    threading.Timer(1.0, first.release).start()
    started = time.time()
    second = RunLock(tmp_path, wait_for_same_job=30).acquire()
    assert 0.9 < time.time() - started < 20
    assert json.loads((tmp_path / ".lock").read_text())["job"] == "99"
    second.release()

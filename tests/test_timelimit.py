"""--time-limit: a job saves its state and exits 99 before its limit, and the resubmitted job continues exactly.

The runs are in-process, on a fake clock: every reading of the time budget's clock is one second after the previous
one, so steps, validations and saves take known "times" and the limit falls at the same place on every machine.
"""
import json
import re
import subprocess

import pytest

from conftest import FAST, REPO, read_metrics
from src.base import budget
from src.base import constants as C
from src.base.budget import TimeBudget, parse_time_limit
from src.base.engine import EXIT_STOPPED
from src.base.main import resume_main, train_main
from src.ft.method import METHOD as FT

RUN = [*FAST, "--batch-size", "4", "--lr", "1e-3", "--max-steps", "12", "--eval-every", "6", "--val-max-images", "4"]
TIMINGS = {"elapsed_seconds", "train_captions_per_second", "val_seconds", "peak_memory_gb", "device_hours"}


def comparable_metrics(output_dir):
    return [{k: v for k, v in line.items() if k not in TIMINGS} for line in read_metrics(output_dir)]


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def time(self):
        self.now += 1.0
        return self.now


@pytest.fixture
def fake_clock(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(budget, "time", clock)
    monkeypatch.setattr(budget, "process_start_time", lambda: clock.now)  # each job (Trainer) starts afresh
    return clock


def test_time_limits_parse_as_hh_mm_ss_or_seconds():
    assert parse_time_limit("23:30:00") == 84600 and parse_time_limit("100:00:00") == 360000
    assert parse_time_limit("3600") == 3600 and parse_time_limit("1:30") == 90  # qstat may show seconds
    assert parse_time_limit("") is None and parse_time_limit(None) is None


@pytest.mark.parametrize("flag, env, expected", [(["--time-limit", "1:90:00"], "", "--time-limit '1:90:00'"),
                                                 (["--time-limit", "00:00:00"], "", "greater than zero"),
                                                 (["--time-limit", "2h"], "", "expected HH:MM:SS"),
                                                 ([], "soon", "TIME_LIMIT 'soon'")])
def test_a_bad_time_limit_is_one_line_and_status_2(flag, env, expected, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(C, "TIME_LIMIT", env)
    for main in (train_main, resume_main):
        with pytest.raises(SystemExit) as exit_info:
            main(FT, ["--output-dir", str(tmp_path / "run"), *flag])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert expected in err, err
    assert not (tmp_path / "run").exists()


def test_the_margin_is_the_measured_save_times_the_factor_with_a_floor(fake_clock):
    limit = TimeBudget(1000, started=fake_clock.now)
    assert limit.needs("step") == C.TIME_LIMIT_MIN_MARGIN  # nothing measured yet: the floor
    with limit.measure("save"):
        fake_clock.now += 99  # a 100 s save
    with limit.measure("validation"):
        fake_clock.now += 49
    assert limit.needs("validation") == 50 + C.TIME_LIMIT_SAVE_FACTOR * 100
    assert limit.needs(None) == C.TIME_LIMIT_SAVE_FACTOR * 100
    fake_clock.now = limit.deadline - 350 - 1  # the next reading leaves exactly 50 + 300 s
    assert limit.fits("validation") and not limit.fits("validation")  # one second later it no longer fits
    assert not TimeBudget(None).deadline and TimeBudget(None).fits("validation")


def _command(data, checkpoint_dir, out, *extra):
    return ["--data-dir", str(data), "--checkpoint", str(checkpoint_dir), "--output-dir", str(out), *RUN, *extra]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_blip, demo_data):
    out = tmp_path_factory.mktemp("straight") / "run"
    assert train_main(FT, _command(demo_data, tiny_blip, out)) == 0
    return out


# on the fake clock a step "takes" 2 s and the margin is 60 s: 20 s more stops before steps, 21 s before validations
@pytest.mark.parametrize("seconds_over_the_margin, stops_before", [(20, "step"), (21, "validation")])
def test_a_job_stops_for_its_time_limit_and_resubmitted_finishes_like_an_uninterrupted_run(
        seconds_over_the_margin, stops_before, tmp_path, monkeypatch, fake_clock, straight, tiny_blip, demo_data):
    out, marker = tmp_path / "limited", tmp_path / "stopped"
    monkeypatch.setenv("STOPPED_FILE", str(marker))  # as multi_gpu_train.sh sets it
    limit = ["--time-limit", str(int(C.TIME_LIMIT_MIN_MARGIN) + seconds_over_the_margin)]
    statuses, stops = [], []
    while not statuses or statuses[-1] == EXIT_STOPPED:  # as SGE requeues a job that exits with 99
        statuses.append(train_main(FT, _command(demo_data, tiny_blip, out, *limit)))
        assert marker.exists() == (statuses[-1] == EXIT_STOPPED)  # what reaches multi_gpu_train.sh through torchrun
        marker.unlink(missing_ok=True)
        if statuses[-1] == EXIT_STOPPED:
            stops.append(json.loads((out / "state" / "progress.json").read_text())["step"])
        assert len(statuses) <= 6, statuses
    assert statuses[0] == EXIT_STOPPED and statuses[-1] == 0
    assert 0 < stops[0] < 12 and stops == sorted(stops)
    log = (out / "train.log").read_text()
    assert log.count("stopping for the time limit:") == len(stops)
    assert f"not enough for the next {stops_before}" in log
    assert f"state saved at step {stops[0]}" in log and "exiting with status 99" in log
    assert comparable_metrics(straight) == comparable_metrics(out)


# ---------------------------------------------------------------- SGE wrappers

def _wrapper(tmp_path, wrapper, job_id=None, qstat_output=None, args=("--epochs", "1"), env=None,
             python='printf "%s\\n" "$@"'):
    """Run the wrapper with python (and qstat, if given) replaced by stand-ins; by default python prints its
    arguments, one per line. The checks the wrappers run before the job's python (src.base.hub in job_env.sh,
    src.base.distributed in multi_gpu_train.sh) pass in silence; multi_gpu_train.sh's `python -c PROGRAM COMMAND...`
    (which sets up a session and execs COMMAND) runs COMMAND."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").write_text('#!/bin/bash\ncase "$2" in src.base.hub|src.base.distributed) exit 0;; esac\n'
                                    '[ "$1" = -c ] && shift 2 && exec "$@"\n'
                                    f'{python}\n')
    if qstat_output is not None:
        (bin_dir / "qstat").write_text(f"#!/bin/bash\n[ \"$1 $2\" = \"-j 4242\" ] && cat <<'END'\n{qstat_output}\nEND\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    (tmp_path / "bin" / "activate").write_text(f'export PATH="{bin_dir}:/usr/bin:/bin"\n')
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "VENV_DIR": str(tmp_path), "TMPDIR": str(tmp_path),
           **({"JOB_ID": job_id} if job_id else {}), **(env or {})}
    return subprocess.run(["bash", wrapper, *args], cwd=REPO, env=env, capture_output=True, text=True)


def _wrapper_argv(tmp_path, wrapper, job_id=None, qstat_output=None, args=("--epochs", "1"), env=None):
    """The arguments the wrapper hands to python."""
    result = _wrapper(tmp_path, wrapper, job_id, qstat_output, args, env)
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.split("\n")[1:-1]  # after the job_env line
            if not line.startswith("starting ")]  # multi_gpu_train.sh's "starting N training processes"


QSTAT = """job_number:                 4242
sge_o_workdir:              /home/someone/vizwiz
hard resource_list:         gpu=1,h_rt=3600
soft resource_list:         h_rt=7200"""


@pytest.mark.parametrize("wrapper, module", [("ft_train.sh", "src.ft.train"), ("peft_train.sh", "src.peft.train")])
def test_wrappers_pass_the_jobs_own_run_time_limit(wrapper, module, tmp_path):
    text = (REPO / wrapper).read_text()
    h_rt = re.search(r"^#\$ -l h_rt=(\S+)$", text, re.M).group(1)
    assert re.search(r"^TIME_LIMIT=(\S+)$", text, re.M).group(1) == h_rt  # the fallback line next to it agrees
    run = ["-m", module]
    assert _wrapper_argv(tmp_path, wrapper, "4242", QSTAT) == [*run, "--time-limit", "3600", "--epochs", "1"]
    assert _wrapper_argv(tmp_path, wrapper, "4242", "") == [*run, "--time-limit", h_rt, "--epochs", "1"]
    assert _wrapper_argv(tmp_path, wrapper) == [*run, "--epochs", "1"]  # not under SGE: no limit


def test_the_multi_gpu_wrapper_passes_the_time_limit_and_exits_99_when_the_run_stopped(tmp_path):
    text = (REPO / "multi_gpu_train.sh").read_text()
    h_rt = re.search(r"^#\$ -l h_rt=(\S+)$", text, re.M).group(1)
    assert re.search(r"^TIME_LIMIT=(\S+)$", text, re.M).group(1) == h_rt
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "src.ft.train"]
    ft, two = ("ft", "--epochs", "1"), {"NGPUS": "2"}
    assert _wrapper_argv(tmp_path, "multi_gpu_train.sh", "4242", QSTAT, ft, two) == [
        *torchrun, "--time-limit", "3600", "--epochs", "1"]
    assert _wrapper_argv(tmp_path, "multi_gpu_train.sh", None, None, ft, two) == [*torchrun, "--epochs", "1"]
    # torchrun exits 1 whenever a process exits non-zero, 99 included: the run's note tells the two apart
    stopped = _wrapper(tmp_path, "multi_gpu_train.sh", "4242", QSTAT, ft, two, python='touch "$STOPPED_FILE"; exit 1')
    assert stopped.returncode == 99 and "exit 99" in stopped.stdout, stopped.stdout + stopped.stderr
    assert not list(tmp_path.glob("stopped.*"))  # the note is removed: the requeued job starts without one
    failed = _wrapper(tmp_path, "multi_gpu_train.sh", "4242", QSTAT, ft, two, python="exit 1")
    assert failed.returncode == 1

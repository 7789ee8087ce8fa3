"""--time-limit: a job saves its state and exits 99 before its limit, and the resubmitted job continues exactly.

The runs are in-process, on a fake clock: every reading of the time budget's clock is one second after the previous
one, so steps, validations and saves take known "times" and the limit falls at the same place on every machine.
"""
import json

import pytest

from conftest import FAST, read_metrics
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
        seconds_over_the_margin, stops_before, tmp_path, fake_clock, straight, tiny_blip, demo_data):
    out = tmp_path / "limited"
    limit = ["--time-limit", str(int(C.TIME_LIMIT_MIN_MARGIN) + seconds_over_the_margin)]
    statuses, stops = [], []
    while not statuses or statuses[-1] == EXIT_STOPPED:  # as SGE requeues a job that exits with 99
        statuses.append(train_main(FT, _command(demo_data, tiny_blip, out, *limit)))
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

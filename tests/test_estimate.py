"""The run-time estimator (scripts/estimate.py) and its measuring pieces (src/base/profiling.py): the schedule
arithmetic, re-planning from a saved profile, the batch-size search, and the prediction against a real run."""
import json
import resource
from types import SimpleNamespace

import pytest
import torch
from conftest import FAST, read_metrics, run_module

from scripts import estimate
from src.base import profiling
from src.base.budget import save_margin
from src.base.config import defaults, resolve, training_parser
from src.base.engine import Trainer
from src.base.helpers import UserError, log
from src.ft.method import METHOD

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"


def plan(**changes):
    values = {"batch_size": 8, "epochs": 1, "max_steps": 100, "eval_every": 40, "save_every": 25,
              "save_every_minutes": 1e9, "train_images": 240, "val_images": 40, "eval_at_start": False}
    return estimate.Plan(**{**values, **changes})


# ---------------------------------------------------------------- the arithmetic of a prediction

def test_replay_validates_and_saves_where_the_engine_does():
    p = plan()  # 30 steps per epoch: validations at 30, 40, 60, 80, 90 and at the last step, 100; saves also at 25, 50, 75
    timeline = estimate.replay(p, step_seconds=1.0, validation_seconds=10.0, state_save_seconds=2.0, best_save_seconds=3.0)
    assert (p.steps_per_epoch, p.total_steps) == (30, 100)
    assert (timeline.validations, timeline.saves) == (6, 9)
    assert timeline.seconds == pytest.approx(100 * 1.0 + 6 * (10.0 + 3.0) + 9 * 2.0)


def test_replay_counts_the_starting_models_validation_and_its_saves():
    without, with_start = (estimate.replay(plan(eval_at_start=start), 1.0, 10.0, 2.0, 3.0) for start in (False, True))
    assert (with_start.validations, with_start.saves) == (without.validations + 1, without.saves + 1)
    assert with_start.seconds == pytest.approx(without.seconds + 10.0 + 3.0 + 2.0)


def test_replay_in_epochs_validates_at_each_epoch_end():
    p = plan(max_steps=0, epochs=3, eval_every=0, save_every=0, train_images=100, batch_size=16)  # 7 steps per epoch
    timeline = estimate.replay(p, 1.0, 5.0, 0.0, 0.0)
    assert (p.total_steps, timeline.validations, timeline.saves) == (21, 3, 3)


def test_replay_saves_by_the_clock():
    p = plan(eval_every=0, save_every=0, save_every_minutes=0.5, train_images=1000)  # no epoch end in 100 steps
    timeline = estimate.replay(p, 1.0, 0.0, 0.0, 0.0)
    assert (timeline.validations, timeline.saves) == (1, 4)  # after 31, 62 and 93 s; the last step's validation


def test_h_rt_adds_the_margin_and_rounds_up_to_the_minute():
    assert estimate.h_rt(3600, 1.25) == "01:15:00"
    assert estimate.h_rt(3601, 1.25) == "01:16:00"
    assert estimate.h_rt(1, 1.25) == "00:01:00"
    assert estimate.h_rt(30 * 3600, 1.0) == "30:00:00"


def synthetic_profile(**changes):
    config = {**defaults(METHOD), "batch_size": 8, "max_steps": 60, "eval_every": 30, "val_max_images": 0}
    return {"method": "ft", "device": "CPU (2 cores)", "precision": "fp32", "config": config, "train_images": 240,
            "train_captions": 1200, "val_images_all": 40, "startup_seconds": 7.0, "warmup_steps": 3,
            "profile_steps": 10, "step_seconds": 0.5, "captions_per_step": 40.0, "validation_fixed_seconds": 1.0,
            "validation_seconds_per_image": 0.01, "validation_images_timed": 40, "state_save_seconds": 0.25,
            "best_save_seconds": 0.5, "first_validation_extra_seconds": 2.0, "peak_memory_gb": 0.5,
            "largest_batch": None, **changes}


def test_predict_adds_up_startup_steps_validations_and_saves():
    profile = synthetic_profile(largest_batch={"batch_size": 32, "step_seconds": 1.5, "captions_per_step": 160.0,
                                               "peak_memory_gb": 9.0})
    q = estimate.predict(profile, plan(max_steps=60, eval_every=30, save_every=500), margin=1.25)
    validation = 1.0 + 0.01 * 40
    assert q["validation_seconds"] == pytest.approx(validation)
    assert (q["validations"], q["state_saves"]) == (2, 2)
    assert q["epoch_seconds"] == pytest.approx(30 * 0.5)
    assert q["captions_per_second"] == pytest.approx(80.0)
    assert q["whole_run_seconds"] == pytest.approx(7.0 + 60 * 0.5 + 2 * (validation + 0.5) + 2.0 + 2 * 0.25)
    assert q["h_rt"] == estimate.h_rt(q["whole_run_seconds"], 1.25)
    assert q["largest_batch"]["epoch_seconds"] == pytest.approx(8 * 1.5)  # 240 images in steps of 32


@pytest.fixture
def keep_log_handlers():
    """main() logs to the stdout it finds, which capsys closes after the test: put the previous handlers back."""
    handlers = list(log.handlers)
    yield
    log.handlers[:] = handlers


def test_from_profile_replans_for_other_sizes_without_profiling(tmp_path, capsys, keep_log_handlers):
    profile_file, out = tmp_path / "profile.json", tmp_path / "plan.json"
    profile_file.write_text(json.dumps({"profile": synthetic_profile()}))
    assert estimate.main(["ft", "--from-profile", str(profile_file), "--max-steps", "0", "--epochs", "2",
                          "--eval-every", "0", "--train-images", "23431", "--val-images", "7750",
                          "--val-max-images", "1000", "--json", str(out)]) == 0
    q = json.loads(out.read_text())["prediction"]
    # the default --eval-at-start validates the starting model too: step 0 and both epoch ends
    assert (q["steps_per_epoch"], q["total_steps"], q["validations"]) == (2929, 5858, 3)
    assert q["epoch_seconds"] == pytest.approx(2929 * 0.5)
    assert q["validation_seconds"] == pytest.approx(1.0 + 0.01 * 1000)  # --val-max-images caps the 7,750
    assert "-l h_rt=" + q["h_rt"] in capsys.readouterr().out


def test_from_profile_refuses_settings_that_change_the_measured_costs(tmp_path, capsys, keep_log_handlers):
    profile_file = tmp_path / "profile.json"
    profile_file.write_text(json.dumps({"profile": synthetic_profile()}))
    with pytest.raises(SystemExit) as exit_info:
        estimate.main(["ft", "--from-profile", str(profile_file), "--batch-size", "16"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--batch-size" in error and len(error.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        estimate.main(["peft", "--from-profile", str(profile_file)])
    assert "profiled for ft" in capsys.readouterr().err


# ---------------------------------------------------------------- the batch-size search

def test_search_halves_on_out_of_memory_until_a_step_fits():
    tried = []

    def try_batch(size):
        tried.append(size)
        if size > 12:
            raise torch.cuda.OutOfMemoryError(OOM)

    assert profiling.largest_batch_that_fits(try_batch, 64) == 8
    assert tried == [64, 32, 16, 8]


def test_search_passes_other_errors_on_and_says_when_nothing_fits():
    def broken(size):
        raise ValueError("not about memory")

    def never_fits(size):
        raise torch.cuda.OutOfMemoryError(OOM)

    with pytest.raises(ValueError):
        profiling.largest_batch_that_fits(broken, 8)
    with pytest.raises(UserError, match="not even one image"):
        profiling.largest_batch_that_fits(never_fits, 8)


@pytest.fixture(scope="module")
def tiny_trainer(tiny_blip, demo_data):
    args = training_parser("test").parse_args(["--data-dir", str(demo_data), "--checkpoint", str(tiny_blip), *FAST])
    return Trainer(METHOD, resolve(METHOD, args))


def test_search_trains_worst_case_batches_of_the_real_trainer(tiny_trainer, monkeypatch):
    assert profiling.largest_batch_on(tiny_trainer, 4) == 4  # a real step on a padded worst-case batch
    seen = []

    def step_that_runs_out_above_20_images(batch):
        seen.append(batch)
        if batch["pixel_values"].shape[0] > 20:
            raise torch.cuda.OutOfMemoryError(OOM)
        return 1.0, True

    monkeypatch.setattr(tiny_trainer, "train_batch", step_that_runs_out_above_20_images)
    assert profiling.largest_batch_on(tiny_trainer, 64) == 16
    assert [batch["pixel_values"].shape[0] for batch in seen] == [64, 32, 16]
    most_captions = max(len(r.captions) for r in tiny_trainer.train_records)
    for batch in seen:
        assert batch["input_ids"].shape[1] == tiny_trainer.config.max_caption_tokens
        assert batch["captions_per_image"].min() == most_captions


def test_largest_batch_is_timed_with_batches_of_its_size(tiny_trainer):
    largest = estimate.measure_largest_batch(tiny_trainer, SimpleNamespace(search_from=4, profile_steps=2))
    assert largest["batch_size"] == 4 and largest["step_seconds"] > 0
    assert 4 <= largest["captions_per_step"] <= 4 * max(len(r.captions) for r in tiny_trainer.train_records)


def test_find_batch_size_starts_from_the_configured_batch(tiny_trainer, monkeypatch):
    monkeypatch.setattr(profiling.torch.cuda, "is_available", lambda: True)  # a GPU, as far as the search knows
    monkeypatch.setattr(profiling, "Trainer", lambda method, config: tiny_trainer)
    def step_that_runs_out_above_10_images(batch):
        if batch["pixel_values"].shape[0] > 10:
            raise torch.cuda.OutOfMemoryError(OOM)
        return 1.0, True

    monkeypatch.setattr(tiny_trainer, "train_batch", step_that_runs_out_above_10_images)
    assert profiling.find_batch_size(METHOD, SimpleNamespace(batch_size=48)) == 6
    assert profiling.find_batch_size(METHOD, SimpleNamespace(batch_size=48), start=40) == 10


def test_find_batch_size_on_the_cpu_keeps_the_start_without_building_anything(monkeypatch):
    monkeypatch.setattr(profiling.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(profiling, "Trainer", lambda method, config: pytest.fail("built a Trainer on the CPU"))
    assert profiling.find_batch_size(METHOD, SimpleNamespace(batch_size=24)) == 24
    assert profiling.find_batch_size(METHOD, SimpleNamespace(batch_size=24), start=7) == 7


# ---------------------------------------------------------------- the prediction against a real run

def children_cpu_seconds():
    """CPU seconds of this process's children (and theirs) that have ended."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def test_prediction_on_the_demo_is_within_tolerance_of_the_real_run(tiny_blip, demo_data, tmp_path):
    """One estimate, then the real `python -m src.ft.train` with the same flags, each a new interpreter (its startup
    counts, as it does against an SGE h_rt limit). Both are timed in CPU seconds (the estimate with --clock cpu, the
    run as the CPU time of the whole process and its Java tokenizer), on one thread: other work on a shared CPU
    stretches wall time by whatever share it takes, not the CPU time a run needs, so a busy machine cannot fail
    this, and a prediction that leaves out or miscounts a part of the run (startup, steps, validations, saves)
    still does."""
    flags = ["--data-dir", demo_data, "--checkpoint", tiny_blip, "--max-steps", "60", "--eval-every", "30",
             "--val-max-images", "40", *FAST]
    one_thread = {"OMP_NUM_THREADS": "1"}  # no CPU time spent waiting for another thread
    run_module("scripts.estimate", "ft", *flags, "--profile-steps", "20", "--clock", "cpu",
               "--json", tmp_path / "plan.json", env=one_thread, subprocess=True)
    before = children_cpu_seconds()
    run_module("src.ft.train", *flags, "--output-dir", tmp_path / "run", env=one_thread, subprocess=True)
    measured = children_cpu_seconds() - before
    prediction = json.loads((tmp_path / "plan.json").read_text())["prediction"]
    predicted = prediction["whole_run_seconds"]
    print(f"predicted {predicted:.1f} CPU s, measured {measured:.1f} CPU s: {100 * (predicted / measured - 1):+.0f}%")
    metrics = read_metrics(tmp_path / "run")
    assert prediction["validations"] == len(metrics) and prediction["total_steps"] == metrics[-1]["step"]
    assert abs(predicted / measured - 1) <= estimate.TOLERANCE


# ---------------------------------------------------------------- --fit: one job of a given length

@pytest.mark.parametrize("budget_seconds", [150, 240, 600, 3600])
def test_fit_suggestions_replayed_fit_the_budget_with_the_time_limits_margin(budget_seconds):
    profile = synthetic_profile(validation_seconds_per_image=0.05)
    planned = plan(max_steps=0, epochs=5, eval_every=20, save_every=500, val_images=400, eval_at_start=True)
    fitted = estimate.fit(profile, planned, budget_seconds)
    q = estimate.predict(profile, fitted)
    # the engine stops when the next step or validation would leave less than the final save's margin
    assert q["whole_run_seconds"] * estimate.SAFETY_MARGIN + save_margin(profile["state_save_seconds"]) <= budget_seconds
    assert q["validations"] * estimate.validation_seconds(profile, fitted.val_images) <= 0.25 * budget_seconds
    assert 1 <= fitted.val_images <= 400 and 1 <= fitted.total_steps <= planned.total_steps
    if fitted.total_steps == planned.total_steps:  # all the epochs fit: said in epochs
        assert (fitted.max_steps, fitted.epochs) == (0, 5)
    else:
        assert fitted.max_steps == fitted.total_steps
    assert (fitted == planned) == (budget_seconds == 3600)  # an hour holds the whole plan as it is


def test_fit_prints_the_qsub_line_and_refuses_a_budget_too_short(tmp_path, capsys, keep_log_handlers):
    profile_file, out = tmp_path / "profile.json", tmp_path / "plan.json"
    profile_file.write_text(json.dumps({"profile": synthetic_profile()}))
    assert estimate.main(["ft", "--from-profile", str(profile_file), "--max-steps", "600", "--fit", "00:03:00",
                          "--json", str(out)]) == 0
    fitted = json.loads(out.read_text())["fit"]
    steps, eval_every, val_images = (fitted["plan"][key] for key in ("max_steps", "eval_every", "val_images"))
    qsub = (f"qsub -l h_rt=00:03:00 ft_train.sh --batch-size 8 --max-steps {steps} --eval-every {eval_every} "
            f"--val-max-images {val_images} --time-limit 00:03:00")
    assert fitted["qsub"] == qsub and qsub in capsys.readouterr().out
    assert 0 < steps < 600 and estimate.fits(synthetic_profile(), estimate.Plan(**fitted["plan"]), 180)
    for too_short in ("00:01:00", "1:99"):
        with pytest.raises(SystemExit) as exit_info:
            estimate.main(["ft", "--from-profile", str(profile_file), "--fit", too_short])
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and error.startswith("error: --fit") and error.count("\n") == 1, error

"""Runs that survive the cluster: kills, signals, bad images, bad input, failed saves, NaN losses, secrets."""
import hashlib
import os
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import src.base.checkpoint as checkpoint
import src.base.engine as engine
import src.base.objectives as objectives
from conftest import (FAST, REPO, RUN, SAMPLE, comparable_metrics as _comparable_metrics, read_metrics,
                      resume_argv as _argv, run_module, same_weights as _same_weights)
from scripts.make_demo_assets import make_dataset
from src.base.config import resolve, training_parser
from src.base.engine import EXIT_NONFINITE, EXIT_STOPPED, Trainer
from src.base.families.blip2 import QFORMER_LORA_TARGETS
from src.base.precision import tf32_allowed
from src.base.helpers import setup_logging
from src.base.jobs import LOCK_FILE
from src.base.main import resume_main, train_main
from src.ft.method import METHOD as FT
from src.peft.method import METHOD as PEFT

METHODS = {"ft": FT, "peft": PEFT}
def _config(method, *argv):
    return resolve(METHODS[method], training_parser("test").parse_args(list(map(str, argv))))


def _start(method, data, checkpoint_dir, out, *extra):
    return subprocess.Popen([sys.executable, "-m", f"src.{method}.train", *_argv(data, checkpoint_dir, out, *extra)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_state_step(out, at_least, process):
    progress = Path(out) / "state" / "progress.json"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        try:
            if json.loads(progress.read_text())["step"] >= at_least:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.01)
    raise AssertionError(f"the run never saved a state at step >= {at_least}")


def _kill_resume_and_compare(method, data, checkpoint, out, straight, kill_after, steps, *extra):
    """Start a run, SIGKILL it once it has saved the state of step >= kill_after, resume it: the weights and the
    metrics must be those of the uninterrupted run `straight`."""
    print(f"killing after the state of step >= {kill_after}")
    process = _start(method, data, checkpoint, out, *extra)
    _wait_for_state_step(out, kill_after, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = json.loads((out / "state" / "progress.json").read_text())["step"]
    assert killed_at < steps
    result = run_module(f"src.{method}.resume", "--output-dir", out)
    assert f"at step {killed_at}" in result.stdout
    assert _same_weights(straight, out)
    assert _comparable_metrics(straight) == _comparable_metrics(out)


@pytest.mark.parametrize("method", ["ft", "peft"])
def test_sigkill_at_a_random_step_then_resume_matches_uninterrupted(tmp_path, method, straight, tiny_blip, demo_data):
    _kill_resume_and_compare(method, demo_data, tiny_blip, tmp_path / "run", straight[method],
                             random.Random().randint(5, 45), 60)


@pytest.mark.parametrize("family, method, precision, more", [
    ("git", "ft", "fp32", []), ("blip", "ft", "bf16-weights", []),
    ("blip2", "peft", "bf16-weights", ["--lora-targets", ",".join(QFORMER_LORA_TARGETS)])])
def test_other_families_and_precisions_resume_exactly_after_sigkill(tmp_path, request, family, method, precision,
                                                                     more, demo_data):
    """The engine's resume is family-agnostic; checked on a tiny GIT (full fine-tuning) and a tiny BLIP-2 (LoRA).
    bf16-weights resumes from the fp32 master copies it saved (from their bf16 rounding, it would drift), BLIP-2's
    with adapters in its Q-Former too, whose weights stay fp32 beside the bf16 rest."""
    checkpoint = request.getfixturevalue(f"tiny_{family}")
    extra = ["--max-steps", "16", "--eval-every", "8", "--save-every", "2", "--lr", "1e-2", "--precision", precision,
             *more]
    straight = tmp_path / "straight"
    run_module(f"src.{method}.train", *_argv(demo_data, checkpoint, straight, *extra))
    _kill_resume_and_compare(method, demo_data, checkpoint, tmp_path / "run", straight, random.Random().randint(2, 10),
                             16, *extra)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])  # SIGUSR2 and SIGINT share the handler
def test_signal_saves_state_exits_99_and_resume_continues(tmp_path, sig, straight, tiny_blip, demo_data):
    out = tmp_path / "run"
    process = _start("peft", demo_data, tiny_blip, out)
    _wait_for_state_step(out, 10, process)
    process.send_signal(sig)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == EXIT_STOPPED == 99, output[-2000:]
    stopped_at = json.loads((out / "state" / "progress.json").read_text())["step"]
    assert f"received {sig.name}: state saved at step {stopped_at}" in (out / "train.log").read_text()
    assert 10 <= stopped_at < 60
    # a resubmitted job (same train command) picks the run up by itself
    result = run_module("src.peft.train", *_argv(demo_data, tiny_blip, out))
    assert f"resumed from {out / 'state'} at step {stopped_at}" in result.stdout
    assert _same_weights(straight["peft"], out)
    assert _comparable_metrics(straight["peft"]) == _comparable_metrics(out)


def test_signal_during_validation_reruns_that_validation_on_resume(tmp_path, monkeypatch, straight, tiny_blip,
                                                                   demo_data):
    out = tmp_path / "run"
    config = _config("peft", *_argv(demo_data, tiny_blip, out))
    original = engine.caption_records

    def signalled_at_step_40(model, records, *args, **kwargs):
        if trainer.progress.step == 40:
            trainer.stop.received = "SIGUSR2"  # as if SGE announced the kill while validating
        return original(model, records, *args, **kwargs)

    monkeypatch.setattr(engine, "caption_records", signalled_at_step_40)
    setup_logging(None)
    trainer = Trainer(PEFT, config)
    assert trainer.run() == EXIT_STOPPED
    state = json.loads((out / "state" / "progress.json").read_text())
    assert state["step"] == 40 and state["eval_pending"]
    assert [m["step"] for m in read_metrics(out)][-1] < 40

    monkeypatch.setattr(engine, "caption_records", original)
    assert Trainer(PEFT, config).run() == 0
    assert _same_weights(straight["peft"], out)
    assert _comparable_metrics(straight["peft"]) == _comparable_metrics(out)


# ---------------------------------------------------------------- bad images

BROKEN_TRAIN = 5


def _break_images(split_dir, names):
    """Missing, zero-byte, truncated, not-an-image, undecodable (a PNG header then garbage)."""
    missing, empty, truncated, text, garbage = names
    (split_dir / missing).unlink()
    (split_dir / empty).write_bytes(b"")
    data = (split_dir / truncated).read_bytes()
    (split_dir / truncated).write_bytes(data[: len(data) // 3])
    (split_dir / text).write_text("this is not an image\n")
    (split_dir / garbage).write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)


def _add_real_photos(root, split, annotation_file):
    """Copy the real VizWiz sample photos into `split`, with their captions."""
    content = json.loads(annotation_file.read_text())
    sample = json.loads((SAMPLE / "annotations" / "val.json").read_text())
    for image in sample["images"]:
        shutil.copy(SAMPLE / "val" / image["file_name"], root / split / image["file_name"])
        content["images"].append({**image, "id": image["id"] + 900_000})
    if "annotations" in content:
        for i, annotation in enumerate(sample["annotations"]):
            content["annotations"].append({**annotation, "image_id": annotation["image_id"] + 900_000,
                                           "id": 900_000 + i})
    annotation_file.write_text(json.dumps(content))


@pytest.fixture(scope="module")
def broken_data(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("broken") / "vizwiz", train=40, val=12, test=10, seed=3)
    for split, count in [("train", BROKEN_TRAIN), ("val", 2), ("test", 3)]:
        annotation_file = root / "annotations" / f"{split}.json"
        names = [image["file_name"] for image in json.loads(annotation_file.read_text())["images"]]
        _break_images(root / split, (names * 2)[:5] if count == BROKEN_TRAIN else names[:5])
        _add_real_photos(root, split, annotation_file)
    return root


def test_broken_images_are_skipped_counted_and_listed(tmp_path, broken_data, tiny_blip):
    out = tmp_path / "run"
    run_module("src.ft.train", "--data-dir", broken_data, "--checkpoint", tiny_blip, "--output-dir", out,
               *FAST, "--max-steps", "14", "--eval-every", "7")
    metrics = read_metrics(out)
    assert metrics[-1]["images_skipped"] == BROKEN_TRAIN  # distinct images, though seen in two epochs
    listed = [m for row in metrics for m in row["bad_images_new"]]
    assert len(listed) == BROKEN_TRAIN
    log = (out / "train.log").read_text()
    for kind in ["file not found", "cannot decode image"]:
        assert kind in log
    assert all(message in log for message in listed)


def test_broken_test_images_still_get_a_caption(tmp_path, broken_data, tiny_blip):
    out = tmp_path / "run"
    result = run_module("src.ft.test", "--data-dir", broken_data, "--checkpoint", tiny_blip, "--output-dir", out,
                        "--max-new-tokens", "5")
    captions = json.loads((out / "test_captions.json").read_text())
    expected = [image["id"] for image in json.loads((broken_data / "annotations" / "test.json").read_text())["images"]]
    assert [c["image_id"] for c in captions] == expected
    assert "(5 unreadable images got a blank-image caption)" in result.stdout


def test_strict_turns_a_bad_image_into_an_error(tmp_path, broken_data, tiny_blip):
    result = run_module("src.ft.train", "--data-dir", broken_data, "--checkpoint", tiny_blip, "--output-dir",
                        tmp_path / "run", *FAST, "--max-steps", "14", "--strict", check=False)
    assert result.returncode == 2
    last_line = re.split(r"[\r\n]+", result.stderr.strip())[-1]  # after the progress bar
    assert re.fullmatch(r"error: \S+/(train|val)/VizWiz_(train|val)_\d+\.jpg: .* \(--strict\)", last_line), result.stderr


# ---------------------------------------------------------------- bad input: one line, status 2, nothing overwritten

def _digest(directory):
    """Every file of a run directory and its hash, but the logs and the lock (where a run that starts notes who
    holds it: jobs.RunLock)."""
    return {p.relative_to(directory): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(directory).rglob("*")) if p.is_file() and p.suffix != ".log" and p.name != LOCK_FILE}


@pytest.fixture(scope="module")
def finished_ft_run(straight):
    return straight["ft"]


def _bad_data(tmp_path, content):
    root = tmp_path / "data"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "train.json").write_text(content)
    (root / "annotations" / "val.json").write_text(json.dumps({"images": []}))
    return root


@pytest.mark.parametrize("case", ["malformed json", "wrong schema", "missing data dir", "missing checkpoint",
                                  "zero batch size", "not a number", "bad precision", "other method's run",
                                  "bad lora target", "output dir not writable", "resume without state"])
def test_bad_input_gives_one_line_and_status_2_and_overwrites_nothing(case, tmp_path, capsys, tiny_blip, demo_data,
                                                                      finished_ft_run):
    run_copy = tmp_path / "existing-run"
    shutil.copytree(finished_ft_run, run_copy)
    before = _digest(run_copy)
    main, method, argv, expected = train_main, FT, None, None
    base = ["--checkpoint", str(tiny_blip), "--data-dir", str(demo_data), "--output-dir", str(run_copy)]
    if case == "malformed json":
        data = _bad_data(tmp_path, "{oops")
        argv, expected = base + ["--data-dir", str(data)], f"{data / 'annotations' / 'train.json'}: not valid JSON"
    elif case == "wrong schema":
        data = _bad_data(tmp_path, json.dumps({"pictures": []}))
        argv, expected = base + ["--data-dir", str(data)], "train.json: missing field 'images'"
    elif case == "missing data dir":
        argv, expected = base + ["--data-dir", str(tmp_path / "nowhere")], "nowhere: data directory does not exist"
    elif case == "missing checkpoint":  # --fresh: a resumed run ignores --checkpoint; nothing is deleted before it loads
        argv, expected = base + ["--checkpoint", str(tmp_path / "no-model"), "--fresh"], "--checkpoint"
    elif case == "zero batch size":
        argv, expected = base + ["--batch-size", "0"], "--batch-size must be positive"
    elif case == "not a number":
        argv, expected = base + ["--lr", "fast"], "argument --lr: invalid float value: 'fast'"
    elif case == "bad precision":
        argv, expected = base + ["--precision", "fp8"], "--precision must be"
    elif case == "other method's run":
        method, argv, expected = PEFT, base, "holds a 'ft' run, not 'peft'"
    elif case == "bad lora target":
        method, argv = PEFT, base + ["--output-dir", str(tmp_path / "new"), "--lora-targets", "nonexistent"]
        expected = "--lora-targets nonexistent"
    elif case == "output dir not writable":
        (tmp_path / "a-file").write_text("")
        argv, expected = base + ["--output-dir", str(tmp_path / "a-file" / "run")], "cannot write there"
    elif case == "resume without state":
        main, argv, expected = resume_main, ["--output-dir", str(tmp_path / "empty")], "no training state to resume"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(method, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert expected in err, err
    assert _digest(run_copy) == before


def test_command_line_errors_are_one_line_from_the_real_entry_point(tmp_path):
    result = run_module("src.ft.resume", "--output-dir", tmp_path / "nothing-here", check=False, subprocess=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    result = run_module("src.peft.test", "--split", "train", check=False, subprocess=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "invalid choice" in result.stderr


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _assert_one_line_naming(result, path, *advice):
    """Exit status 2 and one line on stderr: `error: <path>: <problem>; <what to do>`, never torch's advice to
    unpickle with weights_only=False (which would run whatever the file holds)."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {path}: "), result.stderr[-3000:]
    assert "; " in result.stderr and all(words in result.stderr for words in advice), result.stderr
    assert "weights_only" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("method, command", [("ft", "test"), ("ft", "train"), ("peft", "test"), ("peft", "train")])
def test_a_truncated_best_model_is_one_line_naming_the_file_and_changes_nothing(method, command, tmp_path, straight,
                                                                               demo_data):
    run = tmp_path / "run"
    shutil.copytree(straight[method], run)
    damaged = run / "best_model" / ("model.safetensors" if method == "ft" else "adapter_model.safetensors")
    _truncate(damaged)
    before = _digest(run)
    if command == "test":
        result = run_module(f"src.{method}.test", "--output-dir", run, check=False)
    else:  # a new run from it
        result = run_module(f"src.{method}.train", "--data-dir", demo_data, "--checkpoint", run / "best_model",
                            "--output-dir", tmp_path / "new", *FAST, "--max-steps", "2", check=False)
    _assert_one_line_naming(result, damaged, "truncated", "--checkpoint")
    assert _digest(run) == before


class _RunsCode:
    """A pickled object that creates a file when unpickled: what torch.load(weights_only=False) would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


STATE_DAMAGE = {
    "trainable truncated": ("trainable.safetensors", _truncate),
    "optimizer truncated": ("optimizer.pt", _truncate),
    "optimizer garbage": ("optimizer.pt", lambda path: path.write_bytes(b"not a torch file" * 64)),
    "optimizer pickles code": ("optimizer.pt", lambda path: torch.save(
        {"optimizer": _RunsCode(path.parent.parent / "pwned")}, path)),
    "progress invalid json": ("progress.json", lambda path: path.write_text(path.read_text()[:-10])),
    "progress missing keys": ("progress.json", lambda path: path.write_text(json.dumps({"step": 3}))),
}


@pytest.mark.parametrize("command", ["resume", "train"])  # train resumes a run it finds by default
@pytest.mark.parametrize("damage", STATE_DAMAGE)
def test_a_damaged_training_state_is_one_line_naming_the_file_and_changes_nothing(damage, command, tmp_path,
                                                                                 finished_ft_run):
    run = tmp_path / "run"
    shutil.copytree(finished_ft_run, run)
    name, spoil = STATE_DAMAGE[damage]
    spoil(run / "state" / name)
    before = _digest(run)
    result = run_module(f"src.ft.{command}", "--output-dir", run, check=False)
    _assert_one_line_naming(result, run / "state" / name, "--fresh", "backup", f"--checkpoint {run / 'best_model'}")
    assert _digest(run) == before
    assert not (run / "pwned").exists()


# ---------------------------------------------------------------- failed saves

def test_a_save_that_fails_part_way_leaves_the_previous_state_and_best_model(tmp_path, monkeypatch, tiny_blip,
                                                                            demo_data):
    out = tmp_path / "run"
    config = _config("ft", *_argv(demo_data, tiny_blip, out), "--max-steps", "4", "--eval-every", "2")
    setup_logging(None)
    trainer = Trainer(FT, config)
    assert trainer.run() == 0
    before = _digest(out / "state"), _digest(out / "best_model")

    def disk_full(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(OSError):
        checkpoint.save_training_state(out, trainer.model, trainer.optimizer, trainer.scheduler, None,
                                       trainer.progress, config)
    monkeypatch.setattr(trainer.processor, "save_pretrained", lambda *a, **k: disk_full(None, out / "best_model.tmp/x"))
    with pytest.raises(OSError):
        checkpoint.save_best_model(out, trainer.model, trainer.family, config)
    monkeypatch.undo()

    assert (_digest(out / "state"), _digest(out / "best_model")) == before
    assert not (out / "state.tmp").exists() and not (out / "best_model.tmp").exists()
    fresh = Trainer(FT, config)
    progress = checkpoint.load_training_state(out, fresh.model, fresh.optimizer, fresh.scheduler, None)
    assert progress.step == 4


def test_training_goes_on_when_saving_fails(tmp_path, monkeypatch, tiny_blip, demo_data, caplog):
    out = tmp_path / "run"
    config = _config("ft", *_argv(demo_data, tiny_blip, out), "--max-steps", "6", "--eval-every", "3")
    calls = []

    def full_disk_after_first_save(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return original(*args, **kwargs)

    original = engine.save_training_state
    monkeypatch.setattr(engine, "save_training_state", full_disk_after_first_save)
    setup_logging(out / "train.log")
    assert Trainer(FT, config).run() == 0
    log = (out / "train.log").read_text()
    assert "could not save the training state" in log and "No space left on device" in log
    assert json.loads((out / "state" / "progress.json").read_text())["step"] == 3  # the one good save


# ---------------------------------------------------------------- numerical faults

def test_nonfinite_losses_are_skipped_and_a_streak_stops_the_run(tmp_path, monkeypatch, tiny_blip, demo_data):
    calls = {"all": 0, "finite": 0}
    original = objectives.CrossEntropy.loss

    def loss_with_nans(self, model, batch):
        calls["all"] += 1
        loss = original(self, model, batch)
        if calls["all"] == 3 or calls["all"] >= 30:  # one lone NaN, then NaN for good
            return loss * float("nan")
        calls["finite"] += 1
        return loss

    monkeypatch.setattr(objectives.CrossEntropy, "loss", loss_with_nans)
    out = tmp_path / "run"
    config = _config("ft", *_argv(demo_data, tiny_blip, out), "--max-steps", "40", "--eval-every", "10")
    setup_logging(out / "train.log")
    assert Trainer(FT, config).run() == EXIT_NONFINITE
    metrics = read_metrics(out)
    assert metrics[0]["step"] == 10 and metrics[0]["nonfinite_steps"] == 1  # the lone NaN was skipped
    last_good_step = calls["finite"]
    assert last_good_step == 28
    # the streak wrote nothing: the state is the last one saved (every 5 steps and at validations) before it
    saved_at = {s for s in range(5, 41, 5)} | {m["step"] for m in metrics}
    state = json.loads((out / "state" / "progress.json").read_text())
    assert state["step"] == max(s for s in saved_at if s <= last_good_step)
    assert state["nonfinite_in_a_row"] < 5  # saved before the streak was long enough to stop
    assert "5 non-finite losses in a row" in (out / "train.log").read_text()



def _nan_gradients(monkeypatch, calls=None):
    """The first `calls` training losses (all, if None) keep their value but get a NaN gradient, as an fp16
    overflow leaves them."""
    seen = []
    original = objectives.CrossEntropy.loss

    def loss_with_nan_gradient(self, model, batch):
        seen.append(1)
        loss = original(self, model, batch)
        if calls is None or len(seen) <= calls:
            weight = next(p for p in model.parameters() if p.requires_grad)
            loss = loss + (weight.sum() * 0).sqrt()  # adds 0; its gradient is inf * 0
        return loss

    monkeypatch.setattr(objectives.CrossEntropy, "loss", loss_with_nan_gradient)


def _fp16_trainer(config):
    """A Trainer with fp16's loss scaler: the real GradScaler (on the CPU, where training runs in fp32)."""
    trainer = Trainer(FT, config)
    trainer.scaler = torch.amp.GradScaler("cpu")
    return trainer


def test_steps_the_fp16_loss_scaler_skips_change_nothing_and_a_few_at_the_start_are_normal(tmp_path, monkeypatch,
                                                                                            tiny_blip, demo_data):
    _nan_gradients(monkeypatch, calls=8)  # more than MAX_NONFINITE_IN_A_ROW
    out = tmp_path / "run"
    config = _config("ft", *_argv(demo_data, tiny_blip, out), "--max-steps", "10", "--eval-every", "10")
    setup_logging(out / "train.log")
    trainer = _fp16_trainer(config)
    assert trainer.run() == 0
    # 10 real updates: the optimizer, the learning-rate schedule and the step count agree
    assert {int(state["step"]) for state in trainer.optimizer.state.values()} == {10}
    assert trainer.scheduler.last_epoch == trainer.progress.step == 10
    assert trainer.scaler.get_scale() == 2.0 ** (16 - 8)  # halved at each skip
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [10]  # no validation for the skipped batches at step 0
    assert metrics[0]["scaler_skips"] == 8 and metrics[0]["nonfinite_steps"] == 0
    assert metrics[0]["images_seen"] == 10 * 8


def test_fp16_overflows_at_a_loss_scale_of_1_or_less_count_as_non_finite(tmp_path, monkeypatch, tiny_blip,
                                                                         demo_data):
    _nan_gradients(monkeypatch)  # for good
    out = tmp_path / "run"
    setup_logging(out / "train.log")
    trainer = _fp16_trainer(_config("ft", *_argv(demo_data, tiny_blip, out)))
    assert trainer.run() == EXIT_NONFINITE
    p = trainer.progress
    # the scale halves from 2**16 to 2 without counting, then 5 overflows at scales 1 .. 1/16 stop the run
    assert (p.step, p.scaler_skips, p.nonfinite_total) == (0, 16, 5)
    assert trainer.scheduler.last_epoch == 0 and not trainer.optimizer.state
    assert "5 non-finite losses in a row" in (out / "train.log").read_text()


def test_fp32_means_fp32_tf32_only_with_autocast_or_when_asked(tmp_path, tiny_blip, demo_data):
    assert not tf32_allowed("fp32", False)
    assert tf32_allowed("fp32", True) and tf32_allowed("bf16", False) and tf32_allowed("fp16", False)
    argv = _argv(demo_data, tiny_blip, tmp_path)
    assert _config("ft", *argv).tf32 is False and _config("ft", *argv, "--tf32").tf32 is True


# ---------------------------------------------------------------- logs

def test_a_1000_step_run_reports_its_progress_in_plain_lines_in_a_log_file(tmp_path, capfd, tiny_blip, demo_data,
                                                                            monkeypatch):
    """The real Trainer with the update itself made instant (the loop, the data, the validations and the progress
    report are real): in a job's log (stderr is not a terminal) progress is a plain log line now and then (here every
    0.2 s instead of every minute), not one per step, and no bar's carriage returns or cursor moves."""
    import src.base.progress as progress
    monkeypatch.setattr(progress, "LOG_EVERY_SECONDS", 0.2)
    out = tmp_path / "run"
    config = _config("ft", *_argv(demo_data, tiny_blip, out), "--batch-size", "1", "--max-steps", "1000",
                     "--eval-every", "0", "--save-every", "0", "--val-max-images", "2")
    setup_logging(out / "train.log")
    trainer = Trainer(FT, config)
    trainer.train_batch = lambda batch: (2.5, True)
    started = time.time()
    assert trainer.run() == 0
    seconds = time.time() - started
    stdout, stderr = capfd.readouterr()
    assert trainer.progress.step == 1000
    for log in (stdout, stderr, (out / "train.log").read_text()):
        assert "\r" not in log and "\x1b" not in log, log[-2000:]
    lines = [line for line in (out / "train.log").read_text().splitlines() if " training: " in line]
    assert 1 <= len(lines) <= 1 + seconds / 0.2, lines
    assert re.search(r"training: \d+/1000 steps \(\d+%\), [\d.]+ steps/s, \d\d:\d\d:\d\d left, loss 2.5000$", lines[-1])
    assert (out / "train.log").read_text().count("\n") < 40 + len(lines)  # a few lines per validation, none per step


# ---------------------------------------------------------------- secrets

def test_no_token_like_string_in_tracked_files():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert files, "not a git checkout"
    pattern = re.compile(r"hf_[A-Za-z0-9]{30,}|(?i:token|secret|password)\s*[:=]\s*['\"][A-Za-z0-9_\-]{16,}['\"]")
    offenders = []
    for name in files:
        path = REPO / name
        if path.is_file() and path.stat().st_size < 2_000_000:
            if pattern.search(path.read_text(errors="ignore")):
                offenders.append(name)
    assert offenders == []


# ---------------------------------------------------------------- SGE wrappers

@pytest.mark.parametrize("wrapper, command", [("ft_train.sh", "exec python -m src.ft.train"),
                                              ("peft_train.sh", "exec python -m src.peft.train"),
                                              ("test.sh", 'exec python -m "src.$method.test"')])
def test_wrappers_ask_sge_for_one_gpu_and_hand_over_to_python(wrapper, command):
    text = (REPO / wrapper).read_text()
    for directive in ["#$ -N ", "#$ -j y", "#$ -l h_rt=", "#$ -notify", "#$ -l gpu=1", "#$ -cwd"]:
        assert directive in text, directive
    assert command in text  # exec: python gets SGE's signals and the job gets python's exit status
    assert "HF_TOKEN=" not in text


def test_wrapper_runs_with_plain_bash_on_a_workstation():
    env = {**os.environ, "VENV_DIR": sys.prefix}
    result = subprocess.run(["bash", "ft_train.sh", "--help"], cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 0 and "--output-dir" in result.stdout, result.stderr
    result = subprocess.run(["bash", "test.sh", "neither"], cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "usage: test.sh ft|peft" in result.stderr


# a run whose fourth training step fails with an error nothing handles (as a CUDA out-of-memory error would)
CRASH_AT_STEP_4 = r"""
import sys
sys.path.insert(0, ".")
import src.base.engine as engine
from src.base.main import train_main
from src.ft.method import METHOD
step = engine.training_step
calls = []

def crashing(*args, **kwargs):
    calls.append(1)
    if len(calls) == 4:
        raise RuntimeError("CUDA out of memory (a stand-in)")
    return step(*args, **kwargs)

engine.training_step = crashing
raise SystemExit(train_main(METHOD, sys.argv[1:]))
"""


def test_a_crash_with_data_loader_workers_running_exits_at_once_with_its_error(tmp_path, tiny_blip, demo_data):
    """The workers ignore the scheduler's stop signals, so the SIGTERM multiprocessing ends daemon children with at
    exit did not end them, and a run that crashed waited for them forever (the job hung until its time limit).
    Now it exits with the error (status 1), and nothing of it is left running."""
    script = tmp_path / "crash.py"
    script.write_text(CRASH_AT_STEP_4)
    run = subprocess.Popen([sys.executable, str(script), "--data-dir", str(demo_data), "--checkpoint", str(tiny_blip),
                            "--output-dir", str(tmp_path / "run"), *FAST[:2], "--num-workers", "2", "--max-steps", "20",
                            "--no-eval-at-start"], cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = run.communicate(timeout=120)  # measured: 7 s; before, no end
    finally:
        os.killpg(run.pid, signal.SIGKILL) if run.poll() is None else None
    assert run.returncode == 1 and "RuntimeError: CUDA out of memory (a stand-in)" in stderr, stderr[-2000:]
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-s", str(run.pid)], capture_output=True, text=True).stdout.split()
    assert not left, f"processes of the run still running: {left}"

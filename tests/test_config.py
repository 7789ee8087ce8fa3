"""Constants < environment variables of the same name < command-line flags."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, run_module
from src.base.config import CHANGEABLE_ON_RESUME, RunConfig

SHOW = ("import json, sys; from src.base.config import resolve, training_parser; from src.ft.method import METHOD; "
        "c = resolve(METHOD, training_parser('x').parse_args(sys.argv[1:])); "
        "print(json.dumps({k: getattr(c, k) for k in ('batch_size', 'epochs', 'lr', 'data_dir', 'checkpoint')}))")


def _resolved(env, *flags):
    result = subprocess.run([sys.executable, "-c", SHOW, *flags], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, **env})
    return result, (json.loads(result.stdout) if result.returncode == 0 else None)


def test_environment_overrides_constants_and_flags_override_both(tmp_path):
    _, defaults = _resolved({})
    assert defaults["checkpoint"] == "Salesforce/blip-image-captioning-base"
    env = {"BATCH_SIZE": "3", "EPOCHS": "2", "FT_LR": "0.5", "DATA_DIR": str(tmp_path)}
    _, from_env = _resolved(env)
    assert (from_env["batch_size"], from_env["epochs"], from_env["lr"], from_env["data_dir"]) == (3, 2, 0.5, str(tmp_path))
    _, from_flags = _resolved(env, "--epochs", "7", "--lr", "0.25")
    assert (from_flags["batch_size"], from_flags["epochs"], from_flags["lr"]) == (3, 7, 0.25)


def test_a_malformed_environment_variable_is_one_line_and_status_2():
    result, _ = _resolved({"BATCH_SIZE": "lots"})
    assert result.returncode == 2
    assert result.stderr == "error: environment variable BATCH_SIZE='lots' is not a valid int\n"


def test_scst_defaults_to_a_constant_quarter_of_the_methods_rate_and_flags_still_win(tiny_blip):
    from src.base.config import resolve, training_parser
    from src.base.families import apply_recipe
    from src.ft.method import METHOD as FT
    from src.peft.method import METHOD as PEFT

    def config(method, *flags):
        resolved = resolve(method, training_parser("x").parse_args(["--checkpoint", str(tiny_blip), *flags]))
        apply_recipe(resolved, method, str(tiny_blip))
        return resolved

    # the cross-entropy rate and schedule are the family's recipe now (BLIP: LAVIS's; LoRA: this project's)
    for method, lr in ((FT, 1e-5), (PEFT, 2e-4)):
        xe, scst = config(method), config(method, "--objective", "scst")
        assert (xe.lr, xe.lr_schedule, xe.warmup_ratio) == (lr, "cosine", 0.0)
        assert (scst.lr, scst.lr_schedule, scst.warmup_ratio) == (lr * 0.25, "constant", 0.0)
    given = config(FT, "--objective", "scst", "--lr", "1e-6", "--lr-schedule", "cosine", "--warmup-ratio", "0.1")
    assert (given.lr, given.lr_schedule, given.warmup_ratio) == (1e-6, "cosine", 0.1)


@pytest.mark.parametrize("module, argv, expected", [
    ("src.ft.train", ["--max-step", "5"], "--max-step (did you mean --max-steps?)"),  # once taken for --max-steps
    ("src.peft.test", ["--splt=val"], "--splt (did you mean --split?)"),
    ("src.base.evaluate", ["--annotation", "a.json"], "--annotation (did you mean --annotations?)"),
    ("scripts.get_data", ["--data-di", "d"], "--data-di (did you mean --data-dir?)"),
    ("scripts.sweep", ["run", "s.yaml", "--tas", "2"], "--tas (did you mean --task?)"),  # a subcommand's flag
    ("src.ft.resume", ["--colour"], "--colour (see --help)")])
def test_abbreviated_and_unknown_flags_are_refused_in_one_line_with_the_closest_flag(module, argv, expected):
    result = run_module(module, *argv, check=False)
    assert (result.returncode, result.stderr) == (2, f"error: unrecognized argument {expected}\n")


def _saved(run, *keys):
    config = json.loads((run / "config.json").read_text())
    return tuple(config[key] for key in keys)


def test_a_resumed_run_keeps_its_training_settings_says_which_flags_it_ignored_and_records_the_others(
        tmp_path, straight):
    """On the run's 60 steps, finished: the lr (which the saved optimizer state would override anyway), the step count
    (which would stretch its schedule) and the captions kept stay, and the run says so; the validation interval
    changes and is recorded."""
    assert CHANGEABLE_ON_RESUME <= {f.name for f in dataclasses.fields(RunConfig)}
    run = tmp_path / "run"
    shutil.copytree(straight["ft"], run)
    assert _saved(run, "lr", "max_steps", "eval_every", "seed", "batch_size") == (1e-3, 60, 20, 42, 8)
    state = (run / "state" / "trainable.safetensors").read_bytes()

    result = run_module("src.ft.resume", "--output-dir", run, "--lr", "5e-4", "--max-steps", "80", "--eval-every", "7",
                        "--batch-size", "8", "--keep-rejected")
    ignored = [line for line in result.stdout.splitlines() if "IGNORED" in line]
    assert len(ignored) == 1 and ignored[0].startswith("flags IGNORED on resume: --max-steps 80 (stays 60), --lr "
                                                       "0.0005 (stays 0.001), --keep-rejected (stays dropped): ")
    assert "--batch-size" not in ignored[0]  # given, but the run's own value
    assert "changed on resume: --eval-every 7 (was 20); recorded in" in result.stdout
    assert "the run already reached step 60 of 60" in result.stdout
    assert _saved(run, "lr", "max_steps", "eval_every", "drop_rejected") == (1e-3, 60, 7, True)
    assert (run / "state" / "trainable.safetensors").read_bytes() == state
    assert ignored[0] in (run / "train.log").read_text()

    # train on a directory that holds a run resumes it, the same way
    result = run_module("src.ft.train", "--output-dir", run, "--seed", "7", "--find-batch-size")
    assert "flags IGNORED on resume: --seed 7 (stays 42), --find-batch-size (new runs only; stays --batch-size 8)" \
        in result.stdout
    assert _saved(run, "seed") == (42,)

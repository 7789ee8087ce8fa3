"""Constants < environment variables of the same name < command-line flags."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, run_module

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


def test_scst_defaults_to_a_constant_quarter_of_the_methods_rate_and_flags_still_win():
    from src.base import constants as C
    from src.base.config import resolve, training_parser
    from src.ft.method import METHOD as FT
    from src.peft.method import METHOD as PEFT

    def config(method, *flags):
        return resolve(method, training_parser("x").parse_args(list(flags)))

    for method in (FT, PEFT):
        xe, scst = config(method), config(method, "--objective", "scst")
        assert (xe.lr, xe.lr_schedule, xe.warmup_ratio) == (method.default_lr, C.LR_SCHEDULE, C.WARMUP_RATIO)
        assert (scst.lr, scst.lr_schedule, scst.warmup_ratio) == (method.default_lr * 0.25, "constant", 0.0)
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

"""Decoding chosen on validation: `test --split val --tune-decoding` writes decoding.json with every setting's
validation CIDEr-D and picks the best; later `test` runs use it, and flags still override it."""
import json
import shutil

import pytest

from conftest import FAST, run_module
from src.base import decoding


def val_cider(result):
    return json.loads(result.stdout.strip().splitlines()[-1])["CIDEr"]


def test_grid_is_small_and_has_no_duplicates():
    settings = decoding.grid()
    assert len(settings) <= 20
    assert len({tuple(sorted(s.items())) for s in settings}) == len(settings)
    assert {s["num_beams"] for s in settings} == {1, 3, 5}


def test_tuned_decoding_is_chosen_on_validation_and_used_by_later_test_runs(ft_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ft_run, run, ignore=shutil.ignore_patterns("*_captions.json", "decoding.json"))
    # the run's own setting cuts captions to 3 tokens: a grid setting must win
    cut = ["--num-beams", "1", "--min-new-tokens", "0", "--max-new-tokens", "3"]
    result = run_module("src.ft.test", "--output-dir", run, "--split", "val", "--tune-decoding", "--num-workers", "0", *cut)
    tuned = json.loads((run / "decoding.json").read_text())
    rows = tuned["settings"]
    assert len(rows) == len(decoding.grid()) + 1 and tuned["run_setting"]["max_new_tokens"] == 3
    assert rows == sorted(rows, key=lambda r: -r["CIDEr"]) and tuned["best_CIDEr"] == rows[0]["CIDEr"]
    assert tuned["best"]["max_new_tokens"] >= 20, tuned["best"]
    own = next(r["CIDEr"] for r in rows if r["max_new_tokens"] == 3)
    assert tuned["best_CIDEr"] > own + 0.3
    assert "| * |" in result.stdout and "val CIDEr-D" in result.stdout  # the table

    # a later test run uses the best setting, says so, and reproduces its score exactly
    later = run_module("src.ft.test", "--output-dir", run, "--split", "val", "--num-workers", "0")
    assert "decoding from" in later.stdout and "decoding.json" in later.stdout
    assert val_cider(later) == pytest.approx(tuned["best_CIDEr"], abs=1e-9)
    run_module("src.ft.test", "--output-dir", run, "--num-workers", "0")  # the test split too
    assert min(len(c["caption"].split()) for c in json.loads((run / "test_captions.json").read_text())) > 3
    # flags override it
    overridden = run_module("src.ft.test", "--output-dir", run, "--split", "val", "--num-workers", "0", *cut)
    assert val_cider(overridden) == pytest.approx(own, abs=1e-9)


def test_tune_decoding_needs_the_validation_split(ft_run):
    result = run_module("src.ft.test", "--output-dir", ft_run, "--tune-decoding", check=False)
    assert result.returncode == 2 and "--split val" in result.stderr and result.stderr.count("\n") == 1

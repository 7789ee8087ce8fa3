"""Sweeps: a sweep file's configurations, run as SGE array tasks run them, and the table that ranks the runs."""
import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml
from conftest import FAST, REPO, read_metrics

from scripts import summarize
from scripts import sweep as sweep_tool
from src.base.helpers import UserError


def write_sweep(path, spec):
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def tool(script, *args, env=None):
    return subprocess.run([sys.executable, str(REPO / "scripts" / script), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def lora_sweep(tmp_path, **extra):
    spec = {"name": "lora", "method": "peft", "output_root": str(tmp_path / "out"), "fixed": {"epochs": 2},
            "grid": {"lr": [1e-4, 2e-4], "lora-r": [8, 16, 32]}, **extra}
    return write_sweep(tmp_path / "lora.yaml", spec)


def test_grid_runs_every_combination_numbered_in_file_order(tmp_path):
    sweep = sweep_tool.load_sweep(lora_sweep(tmp_path))
    assert [run["name"] for run in sweep.runs] == [
        "001-lr0.0001-lora_r8", "002-lr0.0001-lora_r16", "003-lr0.0001-lora_r32",
        "004-lr0.0002-lora_r8", "005-lr0.0002-lora_r16", "006-lr0.0002-lora_r32"]
    assert sweep.runs[4]["flags"] == {"epochs": 2, "lr": 2e-4, "lora_r": 16}
    assert sweep.swept == ["lr", "lora_r"] and sweep.test_splits == []
    assert sweep_tool.flag_args(sweep.runs[4]["flags"]) == ["--epochs", "2", "--lr", "0.0002", "--lora-r", "16"]


def test_random_draws_are_reproducible_in_range_and_combine_with_the_grid(tmp_path):
    def draws(seed):
        spec = {"method": "ft", "grid": {"batch_size": [8, 16]},
                "random": {"samples": 5, "seed": seed, "params": {"lr": {"log_uniform": [1e-5, 1e-3]},
                                                                  "lora_r": {"choice": [4, 8]},
                                                                  "lora_dropout": {"uniform": [0.0, 0.2]}}}}
        return sweep_tool.load_sweep(write_sweep(tmp_path / f"random{seed}.yaml", spec)).runs

    runs = draws(3)
    assert len(runs) == 10
    assert [r["params"] for r in runs] == [r["params"] for r in draws(3)]
    assert [r["params"]["lr"] for r in runs] != [r["params"]["lr"] for r in draws(4)]
    assert [r["params"]["batch_size"] for r in runs] == [8] * 5 + [16] * 5
    for run in runs:
        assert 1e-5 <= run["params"]["lr"] <= 1e-3 and run["params"]["lora_r"] in (4, 8)
        assert 0 <= run["params"]["lora_dropout"] <= 0.2
    assert len({r["name"] for r in runs}) == 10 and runs[0]["name"].startswith("001-batch_size8-lr")


def test_switches_and_lists_become_train_flags(tmp_path):
    spec = {"method": "peft", "fixed": {"strict": True, "val-meteor": False, "keep_rejected": True,
                                        "keep_precanned": False, "lora_targets": ["query", "value"]},
            "grid": {"lr": ["1e-4"]}}
    run = sweep_tool.load_sweep(write_sweep(tmp_path / "s.yaml", spec)).runs[0]
    assert sweep_tool.flag_args(run["flags"]) == ["--strict", "--no-val-meteor", "--keep-rejected",
                                                  "--lora-targets", "query,value", "--lr", "0.0001"]


@pytest.mark.parametrize("change, problem", [
    ({"epochs": 3}, "unknown key epochs"),
    ({"fixed": {"learning_rate": 1e-4}}, "unknown flag 'learning_rate'"),
    ({"fixed": {"output_dir": "x"}}, "unknown flag 'output_dir'"),
    ({"grid": {}}, "grid: is empty"),
    ({"grid": {"lr": []}}, "lr needs a non-empty list"),
    ({"grid": {"lr": 1e-4}}, "lr needs a non-empty list"),
    ({"fixed": {"lr": 1e-4}}, "lr is both fixed and swept"),
    ({"grid": {"lr": ["fast"]}}, "lr: 'fast' is not a valid float"),
    ({"fixed": {"strict": "yes"}}, "strict: must be true or false"),
    ({"method": "lora"}, "method must be ft or peft"),
    ({"grid": None, "random": {"samples": 0, "params": {"lr": {"choice": [1]}}}}, "samples must be a positive"),
    ({"grid": None, "random": {"samples": 2, "params": {"lr": {"log_uniform": [0, 1]}}}}, "low > 0"),
    ({"test": "train"}, "test: must be true, false, test, val"),
])
def test_bad_sweep_files_name_the_file_and_the_problem(tmp_path, change, problem):
    spec = {"method": "peft", "grid": {"lr": [1e-4, 2e-4], "lora_r": [8]}, **change}
    file = write_sweep(tmp_path / "bad.yaml", {k: v for k, v in spec.items() if v is not None})
    with pytest.raises(UserError) as error:
        sweep_tool.load_sweep(file)
    assert str(error.value).startswith(f"{file}: ") and problem in str(error.value)


def test_command_line_errors_are_one_line_with_status_2(tmp_path):
    bad = tool("sweep.py", "list", write_sweep(tmp_path / "bad.yaml", {"method": "ft", "grid": {"lr": [1], "lr_max": [2]}}))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "bad.yaml: unknown flag 'lr_max'" in bad.stderr
    outside_array_job = tool("sweep.py", "run", lora_sweep(tmp_path), env={"SGE_TASK_ID": "undefined"})
    assert outside_array_job.returncode == 2 and outside_array_job.stderr.count("\n") == 1
    assert "configurations 1 to 6" in outside_array_job.stderr and "qsub -t 1-6" in outside_array_job.stderr
    assert not (tmp_path / "out" / "001-lr0.0001-lora_r8").exists()


def test_task_comes_from_sge_task_id_and_must_be_in_range(monkeypatch):
    monkeypatch.setenv("SGE_TASK_ID", "4")
    assert sweep_tool.task_from(None, 6) == 4
    assert sweep_tool.task_from("2", 6) == 2  # --task wins
    for task in ("0", "7", "1.5"):
        with pytest.raises(UserError, match="configurations 1 to 6"):
            sweep_tool.task_from(task, 6)
    monkeypatch.delenv("SGE_TASK_ID")
    with pytest.raises(UserError, match="SGE_TASK_ID"):
        sweep_tool.task_from(None, 6)


def test_submit_dry_run_prints_one_array_job_and_writes_nothing(tmp_path):
    file = lora_sweep(tmp_path)
    result = tool("sweep.py", "submit", file, "--dry-run", "--qsub", "-tc 2", "--", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"qsub -t 1-6 -N sweep_lora -tc 2 sweep.sh {file} -- --seed 1"
    assert not (tmp_path / "out").exists()


def test_an_edited_sweep_file_does_not_mix_with_the_runs_of_the_old_one(tmp_path):
    sweep_tool.write_manifest(sweep_tool.load_sweep(lora_sweep(tmp_path)))
    sweep_tool.write_manifest(sweep_tool.load_sweep(lora_sweep(tmp_path)))  # the same list again: fine
    with pytest.raises(UserError, match="sweep.json: written for other configurations"):
        sweep_tool.write_manifest(sweep_tool.load_sweep(lora_sweep(tmp_path, fixed={"epochs": 3})))


def test_a_task_passes_sge_notify_signals_to_training_and_returns_its_status(tmp_path):
    ready = tmp_path / "ready"
    child = ("import pathlib, signal, sys, time\n"
             "signal.signal(signal.SIGUSR1, lambda *_: sys.exit(99))\n"
             f"pathlib.Path({str(ready)!r}).touch()\n"
             "time.sleep(30)\nsys.exit(0)\n")

    def notify_when_ready():
        while not ready.exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR1)  # to the task (sweep.py), as SGE's -notify does

    threading.Thread(target=notify_when_ready, daemon=True).start()
    started = time.time()
    assert sweep_tool.run_forwarding_signals([sys.executable, "-c", child]) == 99
    assert time.time() - started < 20
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the task's own handlers are put back


def test_local_runs_past_a_failure_and_stops_at_a_signal(tmp_path, monkeypatch, capsys):
    sweep = sweep_tool.load_sweep(lora_sweep(tmp_path))
    sweep_tool.write_manifest(sweep)
    statuses = iter([3, 0, 99, 0, 0, 0])
    calls = []
    monkeypatch.setattr(sweep_tool, "run_forwarding_signals", lambda command: calls.append(command) or next(statuses))
    assert sweep_tool.run_all(sweep, ["--seed", "1"]) == 99
    out = capsys.readouterr().out
    assert len(calls) == 3  # task 1 failed, 2 ran, 3 was stopped: 4..6 wait for the rerun
    assert calls[1][-4:] == ["--output-dir", str(tmp_path / "out" / "002-lr0.0001-lora_r16"), "--seed", "1"]
    assert "task 1 (001-lr0.0001-lora_r8) exited with status 3" in out and "2 of 6 runs failed or stopped" in out
    assert all(f"| {run['name']} " in out for run in sweep.runs)  # the table lists every run, none with metrics


def test_table_uses_the_run_statistics_when_logged_and_falls_back_for_older_runs(tmp_path):
    root = tmp_path / "sweep"
    root.mkdir()
    names = ["001-lr1", "002-lr2", "003-lr3"]
    (root / "sweep.json").write_text(json.dumps({"runs": [{"name": n, "params": {"lr": i + 1}} for i, n in enumerate(names)]}))
    old = [{"step": 10, "CIDEr": 0.5, "captions_seen": 100, "elapsed_seconds": 50.0},
           {"step": 20, "CIDEr": 0.4, "captions_seen": 200, "elapsed_seconds": 100.0}]
    new = [{"step": 10, "CIDEr": 0.7, "captions_seen": 100, "elapsed_seconds": 60.0, "train_captions_per_second": 4.0,
            "peak_memory_gb": 3.5, "device": "cuda", "num_processes": 2, "device_hours": 60 * 2 / 3600},
           {"step": 20, "CIDEr": 0.9, "captions_seen": 300, "elapsed_seconds": 120.0, "train_captions_per_second": 5.0,
            "peak_memory_gb": 4.0, "device": "cuda", "num_processes": 2, "device_hours": 120 * 2 / 3600}]
    for name, metrics in (("001-lr1", old), ("002-lr2", new)):
        (root / name).mkdir()
        (root / name / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metrics))

    rows = summarize.ranked_rows([root])
    assert [(r["run"], r.get("best")) for r in rows] == [("002-lr2", "*"), ("001-lr1", None), ("003-lr3", None)]
    assert rows[0]["captions_per_s"] == pytest.approx(300 / (100 / 4.0 + 200 / 5.0))  # validation time left out
    assert rows[0]["GPU_hours"] == pytest.approx(240 / 3600) and rows[0]["peak_GB"] == 4.0
    assert rows[0]["CIDEr_per_GPU_hour"] == pytest.approx(0.9 / (240 / 3600))
    assert rows[1]["captions_per_s"] == pytest.approx(2.0) and rows[1]["GPU_hours"] == pytest.approx(100 / 3600)
    assert rows[1]["best_step"] == 10 and rows[1]["CIDEr_per_GPU_hour"] == pytest.approx(0.5 / (50 / 3600))
    lines = summarize.format_table(rows).splitlines()
    header = [cell.strip() for cell in lines[0].split("|")]
    cells = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")] for line in lines[2:]}
    assert cells["001-lr1"][header.index("peak_GB")] == "n/a"
    assert cells["003-lr3"][header.index("val_CIDEr")] == "n/a" and cells["003-lr3"][header.index("lr")] == "3"


def test_two_configuration_sweep_runs_as_sge_array_tasks_and_the_table_ranks_them(tmp_path, tiny_blip, demo_data):
    fast = {flag[2:]: value for flag, value in zip(FAST[::2], FAST[1::2])}
    spec = {"name": "two-lrs", "method": "ft", "output_root": str(tmp_path / "sweep"),
            "fixed": {"data_dir": str(demo_data), "checkpoint": str(tiny_blip), "max_steps": 20, "eval_every": 10,
                      "val_max_images": 20, **fast, "max_new_tokens": 10},
            "grid": {"lr": [1e-6, 1e-3]}}  # the worse one first: the table must reorder them
    file = write_sweep(tmp_path / "two.yaml", spec)
    for task in ("1", "2"):
        result = tool("sweep.py", "run", file, env={"SGE_TASK_ID": task})
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert f"task {task} of 2" in result.stdout

    runs = {"001-lr1e-06": 1e-6, "002-lr0.001": 1e-3}
    best = {}
    for name, lr in runs.items():
        assert json.loads((tmp_path / "sweep" / name / "config.json").read_text())["lr"] == lr
        best[name] = max(read_metrics(tmp_path / "sweep" / name), key=lambda r: r["CIDEr"])
    assert best["002-lr0.001"]["CIDEr"] > best["001-lr1e-06"]["CIDEr"]

    table = tool("summarize.py", tmp_path / "sweep", "--csv", tmp_path / "t.csv", "--plot", tmp_path / "t.png")
    assert table.returncode == 0, table.stderr
    with open(tmp_path / "t.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == sorted(best, key=lambda n: -best[n]["CIDEr"])
    assert [r["best"] for r in rows] == ["*", ""]
    for row in rows:
        assert float(row["val_CIDEr"]) == pytest.approx(best[row["run"]]["CIDEr"])
        assert int(row["best_step"]) == best[row["run"]]["step"] and row["steps"] == "20"
        assert float(row["lr"]) == runs[row["run"]]
        assert float(row["GPU_hours"]) > 0 and float(row["captions_per_s"]) > 0
    lines = table.stdout.splitlines()
    assert [cell.strip() for cell in lines[0].split("|")[1:4]] == ["best", "run", "lr"]
    assert lines[2].startswith("| *    | 002-lr0.001 ") and "001-lr1e-06" in lines[3]
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"

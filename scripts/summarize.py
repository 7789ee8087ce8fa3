"""One table for run directories or whole sweeps, ranked by best validation CIDEr-D, the best run marked.

    python scripts/summarize.py results/ft results/peft
    python scripts/summarize.py results/sweeps/lora-lr-rank --csv sweep.csv --plot sweep.png

A directory holding sweep.json (written by scripts/sweep.py) stands for every run of that sweep, runs not
started yet included, and the flags the sweep varies become columns. Per run it reads metrics.jsonl (written
during training), val_scores.json (`python -m src.<method>.test --split val`) and test_captions.json.
Columns nobody has are left out; a run without a value shows n/a (CSV: an empty cell). The terminal gets the
columns that rank runs; every column goes to summary.md beside the runs (--full FILE to choose), and --csv.

  val_CIDEr            best validation CIDEr-D during training; best_step: the step it came at
  val_images           how many validation images those scores are on (--val-max-images may cut them)
  steps, minutes       steps done and wall time so far (training and validation, summed over resumes)
  GPU_hours            wall time x GPUs (CPU_hours in the terminal when every run ran on the CPU)
  peak_GB              peak GPU memory (process memory on the CPU)
  captions_per_s       training throughput, validation excluded when the run logged it
  CIDEr_per_GPU_hour   val_CIDEr / the GPU-hours spent until the best validation
"""
import argparse
import csv
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.base.cli import ArgumentParser  # noqa: E402
from src.base.report import device_hours, load_run, plot_sweep  # noqa: E402

SWEEP_FILE = "sweep.json"
SCORE_COLUMNS = ["Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]
STAT_COLUMNS = ["val_CIDEr", "val_images", "best_step", "steps", "minutes", "GPU_hours", "peak_GB",
                "captions_per_s", "CIDEr_per_GPU_hour", "test_captions"]
TERMINAL_COLUMNS = ["best", "run", "CIDEr", "val_CIDEr", "val_images", "best_step", "steps", "minutes", "GPU_hours"]


def captions_per_second(metrics):
    """Training throughput: from the per-validation rates when logged (validation time excluded),
    else captions over the whole wall time."""
    if all("train_captions_per_second" in row for row in metrics):
        seconds, previous = 0.0, 0
        for row in metrics:
            if row["train_captions_per_second"] > 0:
                seconds += (row["captions_seen"] - previous) / row["train_captions_per_second"]
            previous = row["captions_seen"]
        if seconds > 0:
            return metrics[-1]["captions_seen"] / seconds
    elapsed = metrics[-1].get("elapsed_seconds", 0)
    return metrics[-1]["captions_seen"] / elapsed if elapsed and "captions_seen" in metrics[-1] else None


def training_stats(metrics):
    """The table's numbers from a run's metrics.jsonl rows (fields of older runs may be missing)."""
    if not metrics:
        return {}
    best, last = max(metrics, key=lambda r: r["CIDEr"]), metrics[-1]
    peaks = [r["peak_memory_gb"] for r in metrics if r.get("peak_memory_gb") is not None]
    hours_to_best = device_hours(best)
    return {"val_CIDEr": best["CIDEr"], "val_images": best.get("val_images"), "best_step": best["step"],
            "steps": last["step"], "on_cpu": all(r.get("device") == "cpu" for r in metrics),
            "minutes": last.get("elapsed_seconds", 0) / 60, "GPU_hours": device_hours(last),
            "peak_GB": max(peaks) if peaks else None, "captions_per_s": captions_per_second(metrics),
            # undefined when training never beat the starting model (its step-0 score is the best)
            "CIDEr_per_GPU_hour": best["CIDEr"] / hours_to_best if hours_to_best > 0 and best["step"] > 0 else None}


def summarize(run_dir, params=None):
    """One row: the run's name, the swept `params`, validation scores and training statistics."""
    run = load_run(run_dir)
    row = {"run": run["name"], **(params or {}),
           **{k: v for k, v in (run["val_scores"] or {}).items() if k in SCORE_COLUMNS},
           **training_stats(run["metrics"]), "metrics": run["metrics"]}
    test_file = run["dir"] / "test_captions.json"
    if test_file.is_file():
        row["test_captions"] = len(json.loads(test_file.read_text()))
    return row


def expand(directory):
    """(run directory, swept parameters) for a plain run, or for each run of a sweep's output root."""
    directory = Path(directory)
    sweep_file = directory / SWEEP_FILE
    if not sweep_file.is_file():
        return [(directory, {})]
    sweep = json.loads(sweep_file.read_text())
    return [(directory / run["name"], run["params"]) for run in sweep["runs"]]


def ranked_rows(directories):
    """Rows of every run, best validation CIDEr-D first (runs without metrics last), the best marked."""
    rows = [summarize(run_dir, params) for directory in directories for run_dir, params in expand(directory)]
    rows.sort(key=lambda r: (r.get("val_CIDEr") is None, -(r.get("val_CIDEr") or 0)))
    if rows and rows[0].get("val_CIDEr") is not None:
        rows[0]["best"] = "*"
    return rows


def table_columns(rows, terminal=False):
    """Every column some row has (the swept flags after the run's name), or only the ranking ones (`terminal`)."""
    params = [k for r in rows for k in r if k not in {"best", "run", "metrics", "on_cpu", *SCORE_COLUMNS, *STAT_COLUMNS}]
    keys = ["best", "run", *dict.fromkeys(params), *SCORE_COLUMNS, *STAT_COLUMNS]
    if terminal:
        keys = [k for k in keys if k in TERMINAL_COLUMNS or k in params]
    return [k for k in keys if any(r.get(k) is not None for r in rows) or k in ("best", "run")]


def format_table(rows, keys=None):
    """A markdown table, padded so that it also reads well in a terminal. Device-hours are called CPU_hours when
    every run ran on the CPU."""
    keys = keys or table_columns(rows)
    on_cpu = bool(rows) and all(r.get("on_cpu") for r in rows if "on_cpu" in r) and any("on_cpu" in r for r in rows)

    def cell(row, key):
        value = row.get(key)
        if key == "best":
            return value or ""
        if value is None:
            return "n/a"
        if isinstance(value, float):
            return f"{value:.4f}" if key in (*SCORE_COLUMNS, "val_CIDEr") else f"{value:.4g}"
        return str(value)
    header = [k.replace("GPU_hour", "CPU_hour") if on_cpu else k for k in keys]
    table = [header] + [[cell(r, k) for k in keys] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(keys))]
    lines = ["| " + " | ".join(v.ljust(w) for v, w in zip(line, widths)) + " |" for line in table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def default_full_table(runs):
    """summary.md in the directory that holds the runs (in a sweep's output root when given one)."""
    common = Path(os.path.commonpath([str(Path(run).resolve()) for run in runs]))
    if len(runs) == 1 and not (common / SWEEP_FILE).is_file():
        common = common.parent
    return common / "summary.md"


def write_csv(rows, path):
    keys = table_columns(rows)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def main():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories, or sweep output roots (holding sweep.json)")
    parser.add_argument("--full", metavar="FILE", help="where the table with every column goes (default: summary.md "
                                                       "in the directory that holds the runs)")
    parser.add_argument("--csv", metavar="FILE", help="also write the table as CSV (full precision)")
    parser.add_argument("--plot", metavar="FILE.png", help="also plot validation CIDEr-D against GPU-hours per run")
    args = parser.parse_args()
    rows = ranked_rows(args.runs)
    print(format_table(rows, table_columns(rows, terminal=True)))
    full = Path(args.full or default_full_table(args.runs))
    full.write_text(format_table(rows) + "\n")
    print(f"(every column: {full})")
    if args.csv:
        write_csv(rows, args.csv)
    if args.plot:
        plot_sweep([(r["run"], r["metrics"]) for r in rows], args.plot, best=rows[0]["run"] if rows[0].get("best") else None)


if __name__ == "__main__":
    main()

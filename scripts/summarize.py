"""One table for several run directories: validation scores of each best model, and when it was reached.

    python scripts/summarize.py results/ft results/peft [--markdown]

Reads each directory's val_scores.json (written by `python -m src.<method>.test --split val`)
and metrics.jsonl (written during training).
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.base.report import load_run  # noqa: E402

COLUMNS = ["Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]


def summarize(run_dir):
    run = load_run(run_dir)
    row = {"run": run["name"], **{k: v for k, v in (run["val_scores"] or {}).items() if k in COLUMNS}}
    if run["metrics"]:
        best = max(run["metrics"], key=lambda r: r["CIDEr"])
        last = run["metrics"][-1]
        row.update(best_step=best["step"], steps=last["step"], minutes=last.get("elapsed_seconds", 0) / 60)
    test_file = run["dir"] / "test_captions.json"
    if test_file.is_file():
        row["test_captions"] = len(json.loads(test_file.read_text()))
    return row


def format_table(rows, markdown=False):
    keys = ["run", *COLUMNS, "best_step", "steps", "minutes", "test_captions"]
    keys = [k for k in keys if any(k in r for r in rows)]

    def cell(value):
        return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
    table = [[k for k in keys]] + [[cell(r.get(k, "")) for k in keys] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(line) + " |" for line in table]
        lines.insert(1, "|" + "---|" * len(keys))
        return "\n".join(lines)
    widths = [max(len(line[i]) for line in table) for i in range(len(keys))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in table)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    print(format_table([summarize(run) for run in args.runs], args.markdown))


if __name__ == "__main__":
    main()

"""One self-contained HTML page for one or more run directories: metrics table, curves, example gallery.

    python scripts/report.py results/ft results/peft --out results/report.html

The gallery needs each run's val_captions.json (python -m src.<method>.test --output-dir RUN --split val);
per-image CIDEr-D is computed against the run's validation references. Open the page in any browser.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.base.cli import ArgumentParser  # noqa: E402
from src.base.report import html_report  # noqa: E402


def main():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories")
    parser.add_argument("--out", default="report.html")
    parser.add_argument("--title", default="VizWiz captioning runs")
    args = parser.parse_args()
    missing = [r for r in args.runs if not Path(r).is_dir()]
    if missing:
        sys.exit(print(f"error: {missing[0]}: not a run directory", file=sys.stderr) or 2)
    Path(args.out).write_text(html_report(args.runs, args.title))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

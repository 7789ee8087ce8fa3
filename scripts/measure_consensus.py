"""Beam search against consensus decoding (test --mbr N) on several data sets: one table of validation CIDEr-D,
the paired difference from beam search with its 95% bootstrap interval, and the captioning time.

    python scripts/measure_consensus.py                         # the demo's ft run (bash scripts/demo.sh first)
                                                                # and two synthetic sets, trained here
    python scripts/measure_consensus.py --sets objects --steps 100 --work-dir /tmp/m   # quicker

Rows: beam search, then --mbr with 5 beams, with 3 beams and 7 or 17 samples that only vote (MBR_CHOOSE_FROM=beams,
the default), and with any candidate written (MBR_CHOOSE_FROM=all). Sets: "demo" is the demo's fine-tuned tiny BLIP (--demo-run, default results/demo/ft) on its data set; "objects"
and "layout" are scripts/synthetic_sets.py's generators, each with a tiny BLIP of its own vocabulary trained here
from random weights with cross-entropy (--steps, as the tests' other-set runs), kept in --work-dir and reused by a
later call. Every decoding is run with the checkpoint given explicitly, so no decoding.json applies.
"""
import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.base import constants as C  # noqa: E402
from src.base.cli import ArgumentParser  # noqa: E402
from src.base.data import load_split, with_captions  # noqa: E402
from src.base.evaluate import compare, read_predictions  # noqa: E402
from src.base.main import test_main, train_main  # noqa: E402
from src.ft.method import METHOD as FT  # noqa: E402

# name -> (test flags, MBR_CHOOSE_FROM); the first is the baseline. "vote": the samples only vote, a beam is written
# (the default); "any of": any candidate may be written
DECODINGS = {
    "beam 3 (default)": (["--num-beams", "3"], "beams"),
    "MBR 5: 5-best beams": (["--num-beams", "5", "--mbr", "5"], "beams"),
    "MBR 10: 3 beams, 7 samples vote": (["--num-beams", "3", "--mbr", "10"], "beams"),
    "MBR 20: 3 beams, 17 samples vote": (["--num-beams", "3", "--mbr", "20"], "beams"),
    "MBR 10: any of 3 beams + 7 samples": (["--num-beams", "3", "--mbr", "10"], "all"),
    "MBR 20: any of 3 beams + 17 samples": (["--num-beams", "3", "--mbr", "20"], "all"),
    "MBR 10: any of greedy + 9 samples": (["--num-beams", "1", "--mbr", "10"], "all"),
}
COMMON = ["--split", "val", "--num-workers", "0", "--min-new-tokens", "0", "--max-new-tokens", "20",
          "--eval-batch-size", "64"]


def synthetic_run(kind, work_dir, steps):
    """(data dir, fine-tuned model) of a synthetic set, made and trained once in `work_dir`."""
    from scripts.make_demo_assets import make_tiny_blip
    from scripts.synthetic_sets import make_set, texts
    root = Path(work_dir) / kind
    data, run = root / "data", root / "ce"
    if not (root / "data" / "annotations" / "test.json").is_file():
        make_set(kind, data, train=240, val=200, test=2, seed=7)
    if not (run / "best_model").is_dir():
        tiny = root / "tiny"
        if not (tiny / "config.json").is_file():
            make_tiny_blip(tiny, texts=texts(kind), seed=3)
        status = train_main(FT, ["--data-dir", str(data), "--checkpoint", str(tiny), "--output-dir", str(run),
                                 "--batch-size", "8", "--num-workers", "0", "--num-beams", "1", "--min-new-tokens", "0",
                                 "--max-new-tokens", "20", "--lr", "1e-3", "--eval-every", str(steps), "--max-steps",
                                 str(steps), "--no-eval-at-start", "--fresh"])  # validated once, at the end
        if status:
            sys.exit(f"training on {kind} stopped with status {status}")
    return data, run / "best_model"


def measure(name, data, checkpoint, out_dir):
    """Rows of the table for one data set."""
    references = {r.image_id: r.captions for r in with_captions(load_split(data, "val"))}
    rows, baseline = [], None
    for decoding, (flags, choose_from) in DECODINGS.items():
        out = Path(out_dir) / name / re.sub(r"\W+", "-", decoding).strip("-")
        C.MBR_CHOOSE_FROM = choose_from  # read when consensus chooses
        started = time.perf_counter()
        if test_main(FT, ["--output-dir", str(out), "--checkpoint", str(checkpoint), "--data-dir", str(data),
                          *COMMON, *flags]):
            sys.exit(f"{name}, {decoding}: test failed (see {out / 'test.log'})")
        seconds = time.perf_counter() - started
        predictions = read_predictions(out / "val_captions.json")
        baseline = baseline or predictions
        result = compare(references, baseline, predictions, "auto")
        verdict = {"B is better": "better", "A is better": "worse"}.get(result["verdict"], result["verdict"])
        changed = sum(predictions[i] != baseline[i] for i in references)
        rows.append(f"| {name} | {decoding} | {result['CIDEr_B']:.4f} | {result['difference']:+.4f} "
                    f"[{result['ci95'][0]:+.4f}, {result['ci95'][1]:+.4f}] | {verdict} | "
                    f"{changed}/{len(references)} | {seconds:.0f} |")
    return rows


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["demo", "objects", "layout"], choices=["demo", "objects", "layout"])
    parser.add_argument("--demo-run", default=str(Path(C.RESULTS_DIR) / "demo" / "ft"),
                        help="the demo's fine-tuned run (its config.json names its data set)")
    parser.add_argument("--work-dir", default=str(Path(C.RESULTS_DIR) / "consensus"),
                        help="synthetic sets, their runs and every decoding's captions (default: results/consensus)")
    parser.add_argument("--steps", type=int, default=300, help="training steps on each synthetic set")
    args = parser.parse_args(argv)
    rows = []
    for name in args.sets:
        if name == "demo":
            config = Path(args.demo_run) / "config.json"
            if not config.is_file():
                sys.exit(f"{config}: not found; run bash scripts/demo.sh first (or give --demo-run, or leave demo "
                         f"out of --sets)")
            data, checkpoint = json.loads(config.read_text())["data_dir"], Path(args.demo_run) / "best_model"
        else:
            data, checkpoint = synthetic_run(name, args.work_dir, args.steps)
        rows += measure(name, data, checkpoint, args.work_dir)
    print("| set | decoding | val CIDEr-D | vs beam 3: difference [95% interval] | verdict | captions changed | "
          "seconds |\n|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

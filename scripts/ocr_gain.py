"""What --ocr gains, and what OCR reads, measured (docs/ocr.md quotes its tables).

    python scripts/ocr_gain.py                    # both parts below, in a temporary folder
    OMP_NUM_THREADS=1 python scripts/ocr_gain.py --part synthetic --steps 600 --seeds 1 2
    python scripts/ocr_gain.py --part real

synthetic: a "labels" set (scripts/synthetic_sets.py: made-up brand words printed on packages and signs, named in
  the captions), read by scripts/ocr.py, then the same tiny BLIP trained the same way with and without --ocr;
  a table of validation CIDEr-D (best checkpoint), the share of validation captions that name the printed word,
  training speed and the seconds of a validation pass (from metrics.jsonl). A run already finished in --work-dir
  is reused. On a shared machine, OMP_NUM_THREADS=1 keeps torch's threads from fighting (several times faster).
real: the 15 real VizWiz photos in tests/fixtures/vizwiz_sample: what the engine reads on each, the seconds per
  image on one CPU core (one process, one onnxruntime thread), and on how many photos an OCR word (as --ocr keeps
  them) appears in a reference caption.
"""
import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from src.base.cli import ArgumentParser  # noqa: E402

SAMPLE = REPO / "tests" / "fixtures" / "vizwiz_sample"


def run(module, *args):
    """`python -m module args` in this process (the entry points' main), failing loudly."""
    import importlib
    code = importlib.import_module(module).main([str(a) for a in args])
    if code not in (0, None):
        raise SystemExit(f"{module} {' '.join(map(str, args))} exited {code}")


def synthetic(work, args):
    from scripts.make_demo_assets import make_tiny_blip
    from scripts.synthetic_sets import BRANDS, make_set, texts
    data = make_set("labels", work / "labels", train=args.train, val=args.val, test=2, seed=args.data_seed)
    started = time.perf_counter()
    run("scripts.ocr", "--data-dir", data, "--splits", "train", "val", "--processes", args.processes)
    ocr_seconds = time.perf_counter() - started
    model = make_tiny_blip(work / "tiny-blip", texts=texts("labels"), seed=3)
    references = {a["image_id"]: a["caption"] for a in json.loads((data / "annotations" / "val.json").read_text())
                  ["annotations"]}
    printed = {image_id: next((w for w in BRANDS if re.search(rf"\b{w}\b", caption)), None)
               for image_id, caption in references.items()}
    labelled = [i for i, w in printed.items() if w]
    rows = []
    for seed in args.seeds:
        for ocr in (False, True):
            out = work / f"run-{'ocr' if ocr else 'plain'}-{args.steps}-steps-seed-{seed}"
            metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
                if (out / "metrics.jsonl").is_file() else []
            flags = ["--data-dir", data, "--checkpoint", model, "--output-dir", out, "--batch-size", 8,
                     "--num-workers", 0, "--num-beams", 1, "--max-new-tokens", 20, "--eval-batch-size", 64,
                     "--lr", 1e-3, "--max-steps", args.steps, "--eval-every", max(1, args.steps // 4),
                     "--seed", seed, "--no-eval-at-start", *(["--ocr"] if ocr else [])]
            if not metrics or metrics[-1]["step"] < args.steps:
                run("src.ft.train", *flags)
                metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            run("src.ft.test", "--output-dir", out, "--split", "val")
            captions = {c["image_id"]: c["caption"] for c in json.loads((out / "val_captions.json").read_text())}
            named = sum(bool(re.search(rf"\b{printed[i]}\b", captions[i])) for i in labelled)
            scores = json.loads((out / "val_scores.json").read_text())
            rows.append((seed, "--ocr" if ocr else "without", scores["CIDEr"], named / max(1, len(labelled)),
                         statistics.median(m["train_captions_per_second"] for m in metrics),
                         statistics.median(m["val_seconds"] for m in metrics)))
    print(f"\nsynthetic 'labels' set: {args.train} training / {args.val} validation images "
          f"({len(labelled)} labelled), tiny BLIP, {args.steps} steps; OCR of both splits took {ocr_seconds:.0f} s "
          f"with {args.processes} process(es)")
    print("| seed | run | val CIDEr-D | printed word named | training captions/s | s per validation pass |")
    print("|---|---|---|---|---|---|")
    for seed, name, cider, named, speed, val_seconds in rows:
        print(f"| {seed} | {name} | {cider:.3f} | {named:.0%} | {speed:.0f} | {val_seconds:.1f} |")
    print("(speeds: medians over the run's validations, from metrics.jsonl; this machine's load counts in them)")


def real(work, args):
    from src.base.data import load_split
    from src.base.ocr import words
    data = work / "sample"
    shutil.copytree(SAMPLE, data)  # scripts/ocr.py writes beside the images: not into the repository
    split = "val"
    records = load_split(data, split)
    started, cpu_started = time.perf_counter(), time.process_time()
    run("scripts.ocr", "--data-dir", data, "--splits", split, "--processes", 1, "--threads", 1)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    read = {int(k): v for k, v in json.loads((data / "ocr" / f"{split}.json").read_text())["images"].items()}
    with_text = in_reference = inside = 0

    print(f"\nthe {len(records)} real VizWiz photos of tests/fixtures/vizwiz_sample: {seconds / len(records):.2f} s per "
          f"image in wall time, {cpu_seconds / len(records):.2f} s of CPU time (one process, one onnxruntime thread, "
          f"engine start included)")
    print("| image | OCR words (confidence >= 0.5, as --ocr keeps them) | in a reference | reference word inside an "
          "OCR word |")
    print("|---|---|---|---|")
    for record in records:
        found = words(read[record.image_id], 0.5)
        reference_words = {w for c in record.captions for w in re.split(r"[^0-9a-z]+", c.lower())}
        hits = [w for w in found if w in reference_words]
        # the recogniser often drops the spaces of a line ("anotrepairthiscomputer"): a longer reference word inside
        contained = sorted({r for r in reference_words if len(r) >= 4 for w in found if r in w and r != w})
        with_text += bool(found)
        in_reference += bool(hits)
        inside += bool(contained)
        shown = " ".join(found[:12]) + (" ..." if len(found) > 12 else "")
        print(f"| {record.path.name} | {shown or '-'} | {' '.join(hits) or '-'} | {' '.join(contained) or '-'} |")
    kept = sum(bool(r.captions) for r in records)
    print(f"\nwords found on {with_text} of {len(records)} photos; an OCR word is one of the words of the photo's "
          f"kept reference captions on {in_reference} ({kept} photos have a kept reference); a reference word of 4 "
          f"letters or more is inside a longer OCR word on {inside}")


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["synthetic", "real", "both"], default="both")
    parser.add_argument("--steps", type=int, default=1200, help="training steps of each run (at 600 the runs' "
                        "cosine schedule decays before the model learns to copy the word: docs/ocr.md)")
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--data-seed", type=int, default=11)
    parser.add_argument("--processes", type=int, default=2, help="OCR processes for the synthetic set")
    parser.add_argument("--work-dir", help="keep the data and runs here (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    from src.base.helpers import setup_logging
    setup_logging()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.part in ("real", "both"):
            real(work, args)
        if args.part in ("synthetic", "both"):
            synthetic(work, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

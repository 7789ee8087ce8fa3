"""Does mixed precision change what the model learns? The same training run in each --precision, compared.

    python scripts/precision_check.py --out results/precision            # after make_demo_assets.py

Trains the demo's tiny BLIP on the synthetic VizWiz-style set with the real training engine, once per
precision (default fp32, bf16 and bf16-weights; same seed, same data order), for seeds 0..N-1 (the
seed-to-seed spread is the noise level), and prints each run's best and final validation CIDEr-D.
It runs on a CPU too (bf16 autocast exists there; its kernels round differently from a GPU's).
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.base import constants as C  # noqa: E402
from src.base.cli import ArgumentParser  # noqa: E402
from src.base.config import resolve, training_parser  # noqa: E402
from src.base.engine import Trainer  # noqa: E402
from src.base.helpers import setup_logging  # noqa: E402
from src.ft.method import METHOD  # noqa: E402


def main():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default=C.DEMO_DIR, help="made by scripts/make_demo_assets.py")
    parser.add_argument("--out", default=str(Path(C.RESULTS_DIR) / "precision"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--precisions", default="fp32,bf16,bf16-weights", help="comma-separated --precision values")
    args = parser.parse_args()
    demo, out, rows = Path(args.demo), Path(args.out), []
    for seed in range(args.seeds):
        for precision in args.precisions.split(","):
            run = out / f"{precision}-seed{seed}"
            flags = ["--data-dir", demo / "vizwiz", "--checkpoint", demo / "tiny-blip", "--output-dir", run,
                     "--max-steps", args.steps, "--lr", "1e-3", "--batch-size", "8", "--eval-every", "0",
                     "--precision", precision, "--seed", seed, "--min-new-tokens", "0", "--max-new-tokens", "20"]
            config = resolve(METHOD, training_parser("precision check").parse_args(list(map(str, flags))))
            setup_logging(run / "train.log")
            Trainer(METHOD, config, fresh=True).run()
            metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            rows.append({"seed": seed, "precision": precision, "best_CIDEr": max(m["CIDEr"] for m in metrics),
                         "final_CIDEr": metrics[-1]["CIDEr"], "tokenizer": metrics[-1]["tokenizer"]})
            print(json.dumps(rows[-1]), flush=True)
    (out / "precision_check.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

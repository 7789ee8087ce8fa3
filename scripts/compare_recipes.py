"""Each captioner family trained with its own fine-tuning recipe against BLIP's, and BLIP-2's recipe (its Q-Former and
projection train, OPT frozen) against LoRA on OPT's attention, on the synthetic sets of scripts/synthetic_sets.py,
with tiny random-weight models. Prints a Markdown table (and writes it to <out>/recipes.md).

    python scripts/compare_recipes.py [--sets objects,layout] [--families BLIP,GIT,BLIP-2] [--steps 300]
                                      [--out results/recipes]

Every run is `python -m src.ft.train` (or src.peft) with only the size of the run given (steps, batch, validation)
and one learning rate per method for every arm: the recipes' own rates (1e-5) barely move a randomly initialised
64-wide model in a few hundred steps, so the rates are the one part of a recipe this cannot compare. What differs
between two arms of a family is the rest of the recipe: prompt, label smoothing, warm-up, decoding (beams, lengths,
length penalty) and which parts train. "BLIP's recipe" gives another family BLIP's values of those as flags
(families/blip.py, Blip.recipe).

What it can tell: that each recipe trains through the same engine and which of its settings help or hurt a model that
learns captions from nothing on a small synthetic set. What it cannot: how the real pretrained checkpoints rank or
react (pretrained features, a pretrained OPT and real photos change everything), nor anything about learning rates.
"""
import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.make_demo_assets import make_tiny_blip, make_tiny_blip2, make_tiny_git  # noqa: E402
from scripts.synthetic_sets import make_set, texts  # noqa: E402
from src.base.cli import ArgumentParser  # noqa: E402
from src.base.families import Blip, Family  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_LR = {"ft": "1e-3", "peft": "1e-2"}  # the tiny models' rates (the demo's), the same for every arm of a method
# BLIP's recipe as flags for another family, its learning rate aside (see above): BLIP's values, and this project's
# where BLIP's authors give none
BLIP_RECIPE = [arg for key in ("prompt", "label_smoothing", "warmup_ratio", "lr_schedule", "weight_decay", "num_beams",
                               "max_new_tokens", "min_new_tokens", "length_penalty")
               for arg in ("--" + key.replace("_", "-"), str({**Family.recipe, **Blip.recipe}[key]))]
MAKERS = {"BLIP": make_tiny_blip, "GIT": make_tiny_git, "BLIP-2": make_tiny_blip2}
# (family, arm, method, flags)
ARMS = [
    ("BLIP", "BLIP's recipe (its own)", "ft", []),
    ("GIT", "GIT's recipe", "ft", []),
    ("GIT", "BLIP's recipe", "ft", BLIP_RECIPE),
    ("BLIP-2", "BLIP-2's recipe: Q-Former + projection", "ft", []),
    ("BLIP-2", "BLIP's recipe, Q-Former + projection", "ft", BLIP_RECIPE),
    ("BLIP-2", "BLIP-2's recipe but LoRA r=16 on OPT q/v", "peft", ["--lora-r", "16"]),
]


def run(method, data, checkpoint, out, steps, flags):
    """One training run; returns (best validation CIDEr-D, its step, trainable parameters, minutes)."""
    every = max(1, steps // 3)
    command = [sys.executable, "-m", f"src.{method}.train", "--data-dir", data, "--checkpoint", checkpoint,
               "--output-dir", out, "--lr", TINY_LR[method], "--max-steps", steps, "--eval-every", every,
               "--batch-size", 8, "--num-workers", 0, "--eval-batch-size", 64, "--fresh", *flags]
    start = time.time()
    result = subprocess.run([str(c) for c in command], cwd=REPO, capture_output=True, text=True,
                            env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        sys.exit(f"error: {' '.join(map(str, command))} failed:\n{result.stderr[-2000:]}")
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    best = max(rows, key=lambda row: row["CIDEr"])
    trainable = re.search(r"trainable params: ([\d,]+)", (Path(out) / "train.log").read_text())
    return best["CIDEr"], best["step"], trainable.group(1) if trainable else "?", (time.time() - start) / 60


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="objects,layout", help="synthetic set kinds (scripts/synthetic_sets.py)")
    parser.add_argument("--families", default="BLIP,GIT,BLIP-2")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    parser.add_argument("--train", type=int, default=240, help="training images per set")
    parser.add_argument("--val", type=int, default=100, help="validation images per set")
    parser.add_argument("--out", default=str(REPO / "results" / "recipes"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    families = [f.strip() for f in args.families.split(",")]
    lines = ["| set | family | arm | trainable params | best val CIDEr-D | at step | minutes |",
             "|---|---|---|---|---|---|---|"]
    for kind in [k.strip() for k in args.sets.split(",")]:
        data = make_set(kind, out / kind / "data", train=args.train, val=args.val, test=2, seed=7)
        for family in families:
            checkpoint = MAKERS[family](out / kind / f"tiny-{family.lower()}", texts=texts(kind), seed=3)
            for arm_family, arm, method, flags in ARMS:
                if arm_family != family:
                    continue
                name = re.sub(r"[^a-z0-9]+", "-", f"{family} {arm}".lower()).strip("-")
                cider, step, trainable, minutes = run(method, data, checkpoint, out / kind / name, args.steps, flags)
                lines.append(f"| {kind} | {family} | {arm} | {trainable} | {cider:.4f} | {step} | {minutes:.1f} |")
                print(lines[-1], flush=True)
    table = "\n".join(lines)
    (out / "recipes.md").write_text(table + "\n")
    print(f"\n{table}\n\nwritten to {out / 'recipes.md'}")


if __name__ == "__main__":
    main()

"""Each captioner family's fine-tuning recipe against another's settings, with tiny models on synthetic sets, and
BLIP-2's recipe (its Q-Former and projection train, OPT frozen) against LoRA on OPT's attention from a tiny BLIP-2
whose OPT was first pretrained to write captions. Prints a Markdown table (and writes it to <out>/recipes.md).

    python scripts/compare_recipes.py [--sets objects] [--families BLIP,GIT,BLIP-2] [--steps 300] [--seeds 1,2]
                                      [--train 240] [--val 60] [--pretrain-captions both|coco]
                                      [--out results/recipes]

Every run is `python -m src.ft.train` (or src.peft) with the size of the run given (steps, batch 8, validation every
sixth of the run on --val images) and a tiny-model learning rate (TINY_LR, or the rates an arm lists): the recipes' own rates (1e-5) barely
move a 64-wide model in a few hundred steps, so rates are the one part of a recipe this cannot compare. Each arm runs
once per seed (--seeds: the order of the batches, dropout and LoRA's start); the spread between seeds is the noise a
difference between arms has to beat.

- BLIP and GIT (random weights, on each of --sets): a family's own recipe against another's settings as flags (prompt,
  label smoothing, warm-up, schedule, weight decay, decoding): GIT against BLIP's recipe (families/blip.py), BLIP
  against the project's defaults before issue 19 (no prompt, 30/5 new tokens, warm-up 0.05: families/base.py).
- BLIP-2: the authors' recipe trains the Q-Former with OPT frozen, which only works if OPT already writes the words;
  a random tiny OPT cannot (docs/families.md). So, as the demo does for BLIP (scripts/demo.sh), the tiny BLIP-2 is
  first "pretrained" with every weight training (--train-modules naming every part) on a COCO-style set of the
  demo's shapes (other images than the target's), then adapted to the demo's VizWiz-style set with the recipe
  (Q-Former + projection, OPT frozen), with LoRA r=16 on OPT's q/v (src.peft), and with every weight training as a
  reference, each at the rates in ARMS. --pretrain-captions: "both" (default) captions the pretraining images in
  the demo's COCO-style phrasings and in its VizWiz-style ones, so that OPT knows every word and phrasing of the
  target, as a real OPT knows English; "coco" in the COCO-style phrasings only (scripts/demo.sh's pretraining set), so
  that most words of the target ("background", "wall", "on") are new to OPT. Not on --sets: their words are not in
  what the OPT was pretrained on.

What it can tell: how the recipes' settings other than the rate act on tiny models and small synthetic sets, within the
seeds' spread. What it cannot: how the real pretrained checkpoints rank or respond (their features, a 2.7B OPT, real
photos), anything about the recipes' own rates, image size or data at scale.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.make_demo_assets import (PRETRAIN_TEMPLATES, TEMPLATES, make_dataset, make_tiny_blip,  # noqa: E402
                                      make_tiny_blip2, make_tiny_git)
from scripts.synthetic_sets import make_set, texts  # noqa: E402
from src.base.cli import ArgumentParser  # noqa: E402
from src.base.families import Blip, Blip2, Family  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_LR = {"ft": "1e-3", "peft": "1e-2"}  # the tiny models' rates (the demo's), where an arm names none


def recipe_flags(recipe, keys):
    return [arg for key in keys for arg in ("--" + key.replace("_", "-"), str(recipe[key]))]


# BLIP's recipe as flags for another family, its learning rate aside (see above): BLIP's values, and this project's
# where BLIP's authors give none
BLIP_RECIPE = recipe_flags({**Family.recipe, **Blip.recipe},
                           ("prompt", "label_smoothing", "warmup_ratio", "lr_schedule", "weight_decay", "num_beams",
                            "max_new_tokens", "min_new_tokens", "length_penalty"))
# the project's defaults that BLIP's recipe replaced (issue 19): no prompt, 30/5 new tokens, warm-up 0.05
OLD_DEFAULTS = recipe_flags(Family.recipe, ("prompt", "max_new_tokens", "min_new_tokens", "warmup_ratio"))
EVERY_PART = ["--train-modules", ",".join(Blip2.module_groups)]  # src.ft refuses "all" for BLIP-2
MAKERS = {"BLIP": make_tiny_blip, "GIT": make_tiny_git}
# (family, arm, method, flags, rates: None = TINY_LR's)
ARMS = [
    ("BLIP", "BLIP's recipe (its own)", "ft", [], None),
    ("BLIP", "the old defaults: no prompt, 30/5 new tokens, warm-up 0.05", "ft", OLD_DEFAULTS, None),
    ("GIT", "GIT's recipe", "ft", [], None),
    ("GIT", "BLIP's recipe", "ft", BLIP_RECIPE, None),
    ("BLIP-2", "BLIP-2's recipe: Q-Former + projection, OPT frozen", "ft", [], ["3e-4", "1e-3"]),
    ("BLIP-2", "BLIP-2's recipe but LoRA r=16 on OPT q/v instead", "peft", ["--lora-r", "16"], ["3e-3", "1e-2"]),
    ("BLIP-2", "BLIP-2's recipe but every weight trains (reference)", "ft", EVERY_PART, ["1e-3"]),
]
# the demo's decoding for the pretraining run, as scripts/demo.sh pretrains the tiny BLIP
PRETRAIN_FLAGS = ["--lr", "1e-3", "--min-new-tokens", "0", "--max-new-tokens", "20", *EVERY_PART]


def run(method, data, checkpoint, out, steps, flags):
    """One training run; returns (validation CIDEr-D at step 0, best, its step, trainable parameters, minutes)."""
    command = [sys.executable, "-m", f"src.{method}.train", "--data-dir", data, "--checkpoint", checkpoint,
               "--output-dir", out, "--max-steps", steps, "--eval-every", max(1, steps // 6), "--batch-size", 8,
               "--num-workers", 0, "--eval-batch-size", 64, "--fresh", *flags]
    start = time.time()
    result = subprocess.run([str(c) for c in command], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        sys.exit(f"error: {' '.join(map(str, command))} failed:\n{result.stderr[-2000:]}")
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    first, best = min(rows, key=lambda row: row["step"]), max(rows, key=lambda row: row["CIDEr"])
    trainable = re.search(r"trainable params: ([\d,]+)", (Path(out) / "train.log").read_text())
    return (first["CIDEr"], best["CIDEr"], best["step"], trainable.group(1) if trainable else "?",
            (time.time() - start) / 60)


def slug(*parts):
    return re.sub(r"[^a-z0-9.]+", "-", " ".join(map(str, parts)).lower()).strip("-")


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="objects", help="synthetic set kinds for BLIP and GIT "
                                                          "(scripts/synthetic_sets.py)")
    parser.add_argument("--families", default="BLIP,GIT,BLIP-2")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    parser.add_argument("--seeds", default="1,2", help="training seeds, each arm runs once per seed")
    parser.add_argument("--train", type=int, default=240, help="training images per set")
    parser.add_argument("--val", type=int, default=60, help="validation images per set")
    parser.add_argument("--pretrain-captions", choices=("both", "coco"), default="both",
                        help="BLIP-2's pretraining captions: the demo's COCO-style and VizWiz-style phrasings, or "
                             "the COCO-style ones only (see above)")
    parser.add_argument("--out", default=str(REPO / "results" / "recipes"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    families = [f.strip() for f in args.families.split(",")]
    seeds = [s.strip() for s in args.seeds.split(",")]
    lines = ["| set | family | arm | lr | trainable params | val CIDEr-D at step 0 | best val CIDEr-D, seed "
             + " / ".join(seeds) + " | mean | at steps | minutes per run |", "|---|---|---|---|---|---|---|---|---|---|"]

    def compare(kind, family, data, checkpoint, root):
        for arm_family, arm, method, flags, rates in ARMS:
            if arm_family != family:
                continue
            for lr in rates or [TINY_LR[method]]:
                results = [run(method, data, checkpoint, root / slug(family, arm, lr, "seed", seed), args.steps,
                                [*flags, "--lr", lr, "--seed", seed]) for seed in seeds]
                bests = [r[1] for r in results]
                lines.append(f"| {kind} | {family} | {arm} | {lr} | {results[0][3]} | {results[0][0]:.3f} | "
                             + " / ".join(f"{b:.3f}" for b in bests) + f" | {sum(bests) / len(bests):.3f} | "
                             + " / ".join(str(r[2]) for r in results)
                             + f" | {sum(r[4] for r in results) / len(results):.1f} |")
                print(lines[-1], flush=True)

    for kind in [k.strip() for k in args.sets.split(",")]:
        if not set(families) & set(MAKERS):
            break
        data = make_set(kind, out / kind / "data", train=args.train, val=args.val, test=2, seed=7)
        for family in [f for f in families if f in MAKERS]:
            checkpoint = MAKERS[family](out / kind / f"tiny-{family.lower()}", texts=texts(kind), seed=3)
            compare(kind, family, data, checkpoint, out / kind)
    if "BLIP-2" in families:
        root = out / "blip2"
        templates = PRETRAIN_TEMPLATES + (TEMPLATES if args.pretrain_captions == "both" else [])
        coco = make_dataset(root / "coco-style", args.train, args.val, 0, 1, templates)
        vizwiz = make_dataset(root / "vizwiz", args.train, args.val, 2, 0)
        tiny = make_tiny_blip2(root / "tiny-blip2", seed=3)
        first, best, step, trainable, minutes = run("ft", coco, tiny, root / "pretrained", args.steps, PRETRAIN_FLAGS)
        lines.append(f"| pretraining set ({args.pretrain_captions}) | BLIP-2 | pretraining, every weight (the start of the rows below) | 1e-3 | "
                     f"{trainable} | {first:.3f} | {best:.3f} | | {step} | {minutes:.1f} |")
        print(lines[-1], flush=True)
        compare("VizWiz-style (demo)", "BLIP-2", vizwiz, root / "pretrained" / "best_model", root)
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipes.md").write_text(table + "\n")
    print(f"\n{table}\n\nwritten to {out / 'recipes.md'}")


if __name__ == "__main__":
    main()

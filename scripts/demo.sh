#!/usr/bin/env bash
# The whole pipeline on built-in synthetic data, offline, in a few minutes on a laptop CPU:
#   1. install what is needed (scripts/setup_env.sh) and make the demo assets
#   2. "pretrain" the tiny BLIP on COCO-style captions: a stand-in for Salesforce's pretrained captioners
#   3. adapt it to the VizWiz-style set by full fine-tuning (src.ft) and by LoRA (src.peft),
#      each keeping the checkpoint with the best validation CIDEr-D
#   4. a second stage on the fine-tuned model: self-critical sequence training on CIDEr-D (--objective scst)
#   5. another captioner family through the same entry point: a tiny GIT, fully fine-tuned with GIT's defaults
#   6. choose decoding settings for the fine-tuned model on validation (--tune-decoding)
#   7. write test_captions.json with each best model, and score each on the validation split
#   8. one table of the runs (scripts/summarize.py) and one HTML report (scripts/report.py)
set -euo pipefail
cd "$(dirname "$0")/.."
# the demo runs here: a new environment gets the CPU build of torch where this machine has no GPU (setup_env.sh)
TORCH_SPEC="${TORCH_SPEC:-auto}"
source scripts/setup_env.sh
export HF_HUB_OFFLINE=1
DEMO="${DEMO_DIR:-data/demo}"
OUT="${DEMO_RESULTS:-results/demo}"
STEPS="${DEMO_STEPS:-300}"
QUICK=(--batch-size 8 --eval-every 50 --num-workers 0 --min-new-tokens 0 --max-new-tokens 20 --fresh)

python scripts/make_demo_assets.py --out "$DEMO"
python -m src.ft.train --data-dir "$DEMO/coco-style" --checkpoint "$DEMO/tiny-blip" --output-dir "$OUT/pretrained" \
    --max-steps "$STEPS" --lr 1e-3 "${QUICK[@]}"
python -m src.ft.train --data-dir "$DEMO/vizwiz" --checkpoint "$OUT/pretrained/best_model" --output-dir "$OUT/ft" \
    --max-steps "$STEPS" --lr 1e-3 "${QUICK[@]}"
python -m src.peft.train --data-dir "$DEMO/vizwiz" --checkpoint "$OUT/pretrained/best_model" --output-dir "$OUT/peft" \
    --max-steps "$((2 * STEPS))" --lr 3e-3 "${QUICK[@]}"
python -m src.ft.train --objective scst --data-dir "$DEMO/vizwiz" --checkpoint "$OUT/ft/best_model" \
    --output-dir "$OUT/ft-scst" "${QUICK[@]}" --eval-every 10 --max-steps 40 --lr 5e-5   # (a later flag wins)
# GIT's own recipe (label smoothing 0.1, beam 4, length penalty 0.6, no prompt: docs/families.md), only the run's size
# and the tiny model's rate given (its authors publish no fine-tuning rate; 2e-5 barely moves random weights)
python -m src.ft.train --data-dir "$DEMO/vizwiz" --checkpoint "$DEMO/tiny-git" --output-dir "$OUT/ft-git" \
    --max-steps "$STEPS" --lr 1e-3 --batch-size 8 --eval-every 50 --num-workers 0 --fresh
echo "each run's first validation is its starting model (step 0), e.g. ft's:"
grep -m1 "step 0 (the starting model)" "$OUT/ft/train.log" | cut -d' ' -f3-
python -m src.ft.test --output-dir "$OUT/ft" --split val --tune-decoding

for run in ft peft ft-scst ft-git; do
    method="${run%%-*}"
    python -m "src.$method.test" --output-dir "$OUT/$run"
    python -m "src.$method.test" --output-dir "$OUT/$run" --split val > /dev/null
done
# the pretrained stand-in with no adaptation, scored on the same VizWiz-style validation set
python -m src.ft.test --output-dir "$OUT/zero-shot" --checkpoint "$OUT/pretrained/best_model" \
    --data-dir "$DEMO/vizwiz" --split val --min-new-tokens 0 --max-new-tokens 20 > /dev/null
python scripts/summarize.py "$OUT/zero-shot" "$OUT/ft" "$OUT/peft" "$OUT/ft-scst" "$OUT/ft-git"
python scripts/report.py "$OUT/ft" "$OUT/peft" "$OUT/ft-scst" "$OUT/ft-git" "$OUT/zero-shot" --out "$OUT/report.html" \
    --title "VizWiz captioning demo (synthetic data, tiny models)"
echo
echo "The report (metrics, curves, captions next to their references): $OUT/report.html"
echo "Each run's files: $OUT/<run>/ (ft, peft, ft-scst, ft-git, zero-shot): best_model/, metrics.jsonl, train.log,"
echo "  test_captions.json (the challenge file), val_captions.json, val_scores.json, curves.png, examples/, state/"
echo "The demo's data and tiny models: $DEMO/ (listed in data/README.md)"

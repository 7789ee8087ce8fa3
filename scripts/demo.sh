#!/usr/bin/env bash
# The whole pipeline on built-in synthetic data, offline, in a few minutes on a laptop CPU:
#   1. install what is needed (scripts/setup_env.sh) and make the demo assets
#   2. "pretrain" the tiny BLIP on COCO-style captions: a stand-in for Salesforce's pretrained captioners
#   3. adapt it to the VizWiz-style set by full fine-tuning (src.ft) and by LoRA (src.peft),
#      each keeping the checkpoint with the best validation CIDEr-D
#   4. a second stage on the fine-tuned model: self-critical sequence training on CIDEr-D (--objective scst)
#   5. another captioner family through the same entry point: a tiny GIT, fully fine-tuned with GIT's defaults
#   6. OCR-aware captioning: read the printed words of a set of labelled packages (scripts/ocr.py), then train a
#      tiny BLIP on it with and without those words in its prefix (--ocr)
#   7. choose decoding settings for the fine-tuned model on validation (--tune-decoding)
#   8. write test_captions.json with each best model, and score each on the validation split; consensus decoding
#      (--mbr) of the fine-tuned model, and an ensemble of the four runs (scripts/ensemble.py)
#   9. one table of the runs (scripts/summarize.py) and one HTML report (scripts/report.py)
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
# OCR: packages and signs with a made-up brand word printed on them, named by the captions; a 32x32 tiny model cannot
# read it, so only the OCR words in its prefix can tell it (docs/ocr.md)
python -m scripts.synthetic_sets labels "$DEMO/labels" --train 160 --val 40 --test 10 --tiny-blip "$DEMO/tiny-blip-labels"
python scripts/ocr.py --data-dir "$DEMO/labels"
python -m src.ft.train --data-dir "$DEMO/labels" --checkpoint "$DEMO/tiny-blip-labels" --output-dir "$OUT/labels" \
    --max-steps "$STEPS" --lr 1e-3 "${QUICK[@]}"
python -m src.ft.train --data-dir "$DEMO/labels" --checkpoint "$DEMO/tiny-blip-labels" --output-dir "$OUT/labels-ocr" \
    --max-steps "$STEPS" --lr 1e-3 "${QUICK[@]}" --ocr
echo "the same tiny BLIP on the labels set, without and with the OCR words in its prefix:"
python scripts/summarize.py "$OUT/labels" "$OUT/labels-ocr"
python -m src.ft.test --output-dir "$OUT/ft" --split val --tune-decoding

for run in ft peft ft-scst ft-git; do
    method="${run%%-*}"
    python -m "src.$method.test" --output-dir "$OUT/$run"
    python -m "src.$method.test" --output-dir "$OUT/$run" --split val > /dev/null
done
# consensus decoding on ft's model: 10 candidates per image (its 3 beams and 7 samples), the one the others back most
python -m src.ft.test --output-dir "$OUT/ft-mbr" --checkpoint "$OUT/ft/best_model" --data-dir "$DEMO/vizwiz" \
    --split val --mbr 10 --min-new-tokens 0 --max-new-tokens 20 > /dev/null
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
beam = max(json.loads(line)["CIDEr"] for line in open(f"{out}/ft/metrics.jsonl"))
mbr = json.load(open(f"{out}/ft-mbr/val_scores.json"))["CIDEr"]
print(f"consensus decoding (--mbr 10) of ft's model: val CIDEr-D {mbr:.4f} (beam search: {beam:.4f})")
PY
# an ensemble of the four runs: each image's caption chosen by consensus over their pooled beam candidates (each
# test above wrote them); scored on val against each run's own, then the test split's challenge file
python scripts/ensemble.py "$OUT/ft" "$OUT/ft-scst" "$OUT/peft" "$OUT/ft-git" --split val \
    --output-dir "$OUT/ensemble" | grep "^|"
python scripts/ensemble.py "$OUT/ft" "$OUT/ft-scst" "$OUT/peft" "$OUT/ft-git" --output-dir "$OUT/ensemble" > /dev/null
# the pretrained stand-in with no adaptation, scored on the same VizWiz-style validation set
python -m src.ft.test --output-dir "$OUT/zero-shot" --checkpoint "$OUT/pretrained/best_model" \
    --data-dir "$DEMO/vizwiz" --split val --min-new-tokens 0 --max-new-tokens 20 > /dev/null
python scripts/summarize.py "$OUT/zero-shot" "$OUT/ft" "$OUT/peft" "$OUT/ft-scst" "$OUT/ft-git" "$OUT/ft-mbr" "$OUT/ensemble"
python scripts/report.py "$OUT/ft" "$OUT/peft" "$OUT/ft-scst" "$OUT/ft-git" "$OUT/zero-shot" --out "$OUT/report.html" \
    --title "VizWiz captioning demo (synthetic data, tiny models)"
echo
echo "The report (metrics, curves, captions next to their references): $OUT/report.html"
echo "Each run's files: $OUT/<run>/ (ft, peft, ft-scst, ft-git, zero-shot, labels, labels-ocr): best_model/,"
echo "  metrics.jsonl, train.log, test_captions.json (the challenge file), val_captions.json, val_scores.json,"
echo "  *_candidates.json, curves.png, examples/, state/; $OUT/ft-mbr/ (consensus decoding) and $OUT/ensemble/ (the"
echo "  ensemble) hold captions and scores"
echo "The demo's data and tiny models: $DEMO/ (listed in data/README.md)"

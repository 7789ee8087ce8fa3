#!/usr/bin/env bash
# The standing speed questions on one GPU, in one go (about 5-8 minutes on an H100/H200), offline:
#   1. scripts/benchmark.py at BLIP-base shapes (full fine-tuning, bf16, 384 px), with and without torch.compile,
#      and with --precision bf16-weights; the text decoder with transformers' attention and with the fused one
#   2. scripts/benchmark.py at BLIP-large shapes with LoRA (the src.peft setting), bf16 and bf16-weights
#   3. scripts/precision_check.py: the demo's tiny BLIP trained in fp32, bf16 and bf16-weights, same seeds
# then one table: training captions/s, MFU, peak memory, captioning images/s, the estimated 7,750-image
# validation pass, and bf16 vs fp32 validation CIDEr-D, against the targets of issue 13 (MFU >= 40%,
# validation pass < 1 min, bf16 learns what fp32 learns).
#     bash scripts/gpu_check.sh [OUT_DIR]          # default results/gpu_check; JSON files and gpu_check.txt there
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-results/gpu_check}"
mkdir -p "$OUT"
if [ -x .venv/bin/python ]; then source .venv/bin/activate; fi
export HF_HUB_OFFLINE=1
python - <<'PY' || { echo "gpu_check.sh needs a CUDA GPU (torch.cuda.is_available() is False)"; exit 2; }
import sys, torch
sys.exit(0 if torch.cuda.is_available() else 1)
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python scripts/benchmark.py --shape base --image-size 384 --compile --bf16-weights --compare-attention --skip loading \
    --json "$OUT/base.json"
python scripts/benchmark.py --shape large --lora --image-size 384 --bf16-weights --skip loading,original \
    --json "$OUT/large_lora.json"
python scripts/make_demo_assets.py --out "$OUT/demo" > /dev/null
python scripts/precision_check.py --demo "$OUT/demo" --out "$OUT/precision" --steps 300 --seeds 2 \
    | tee "$OUT/precision.txt"
python - "$OUT" <<'PY' | tee "$OUT/gpu_check.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
for name, file in (("BLIP-base full fine-tuning", "base.json"), ("BLIP-large LoRA r=8", "large_lora.json")):
    r = json.loads((out / file).read_text())
    ours = r["train"]["ours"]
    mfu = ours.get("mfu")
    rows.append((name, "training captions/s", f"{ours['captions_per_s']:.0f}", ""))
    rows.append((name, "training MFU", f"{100 * mfu:.1f}%" if mfu is not None else "n/a", ">= 40%"))
    rows.append((name, "training peak memory", f"{ours['peak_memory_gb']:.1f} GB", ""))
    weights = r["train"].get("ours_bf16_weights")
    if weights:
        rows.append((name, "training captions/s, bf16-weights", f"{weights['captions_per_s']:.0f}",
                     f"{weights['captions_per_s'] / ours['captions_per_s']:.2f}x bf16"))
        if weights.get("mfu") is not None:
            rows.append((name, "training MFU, bf16-weights", f"{100 * weights['mfu']:.1f}%", ">= 40%"))
        rows.append((name, "training peak memory, bf16-weights", f"{weights['peak_memory_gb']:.1f} GB", ""))
    compiled = r["train"].get("ours_compiled")
    if compiled:
        rows.append((name, "training captions/s, --compile", f"{compiled['captions_per_s']:.0f}",
                     f"{compiled['captions_per_s'] / ours['captions_per_s']:.2f}x eager"))
    if "original" in r["train"]:
        rows.append((name, "training vs original template", f"{ours['captions_per_s'] / r['train']['original']['captions_per_s']:.1f}x", ""))
    attention = r.get("attention")
    if attention:
        rows.append((name, "text decoder fwd+bwd, fused attention", f"{attention['speedup']:.2f}x",
                     f"transformers' attention {attention['plain_step_s'] * 1000:.0f} ms/step"))
    images = r["caption"]["ours"]["images_per_s"]
    rows.append((name, "captioning images/s (3 beams)", f"{images:.0f}", ""))
    rows.append((name, "validation pass, 7,750 images", f"{7750 / images / 60:.2f} min", "< 1 min"))
print(f"GPU: {(out / 'gpu.txt').read_text().strip()}")
width = max(len(a) + len(b) for a, b, _, _ in rows) + 3
for model, what, value, target in rows:
    print(f"{model + ' | ' + what:{width}}  {value:>12}  {target}")
runs = [json.loads(line) for line in (out / "precision.txt").read_text().splitlines() if line.startswith("{")]
for precision in dict.fromkeys(r["precision"] for r in runs):
    best = [r["best_CIDEr"] for r in runs if r["precision"] == precision]
    print(f"{'tiny BLIP, 300 steps | best val CIDEr-D, ' + precision:{width}}  "
          f"{' / '.join(f'{b:.3f}' for b in best):>12}  per seed; bf16 should match fp32")
PY

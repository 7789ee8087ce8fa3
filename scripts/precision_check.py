"""Does mixed precision change what the model learns? Train the same run in fp32 and in bf16, compare.

    python scripts/precision_check.py --out results/precision            # after scripts/make_demo_assets.py

Trains the demo's tiny BLIP on the synthetic VizWiz-style set twice (same seed, same data order),
once in fp32 and once under bf16 autocast, captions the validation set with each, writes
val_captions_<precision>.json and prints each one's CIDEr-D (PTB tokenizer where Java is installed,
the Python tokenizer otherwise: compare rows scored the same way). Seeds 0..N-1 give the noise level.
"""
import argparse
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.base import constants as C  # noqa: E402
from src.base.data import (CaptionCollator, CaptionTrainingSet, EpochBatchSampler, ImageTransform,  # noqa: E402
                           caption_token_ids, load_split, make_loader, with_captions)
from src.base.engine import caption_records, training_step  # noqa: E402
from src.base.evaluate import score_captions  # noqa: E402
from src.base.modeling import decoder_token_ids, load_captioner, load_processor  # noqa: E402


def train_and_caption(data_dir, checkpoint, precision, device, steps, seed, batch_size=8, lr=1e-3):
    torch.manual_seed(seed)
    processor, model = load_processor(checkpoint), load_captioner(checkpoint).to(device)
    train_records = with_captions(load_split(data_dir, "train"))
    val_records = with_captions(load_split(data_dir, "val"))
    bos, eos, pad = decoder_token_ids(model)
    transform = ImageTransform(processor.image_processor)
    tokens = caption_token_ids(processor.tokenizer, train_records, 40, bos, eos)
    sampler = EpochBatchSampler(len(train_records), batch_size, seed)
    loader = make_loader(CaptionTrainingSet(train_records, transform, tokens), 0, CaptionCollator(pad),
                         batch_sampler=sampler)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=device.type == "cuda" or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 15)
                                                  * 0.5 * (1 + math.cos(math.pi * s / steps)))
    step, epoch = 0, 0
    while step < steps:
        sampler.set_epoch(epoch)
        for batch in loader:
            training_step(model, batch, optimizer, scheduler, None, precision, device, 1.0)
            step += 1
            if step >= steps:
                break
        epoch += 1
    settings = SimpleNamespace(eval_batch_size=64, num_beams=3, max_new_tokens=20, min_new_tokens=0, num_workers=0,
                               strict=False)
    predictions, _ = caption_records(model, val_records, transform, processor.tokenizer, settings, device, precision,
                                     f"captioning ({precision})")
    return predictions, {r.image_id: r.captions for r in val_records}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default=C.DEMO_DIR, help="made by scripts/make_demo_assets.py")
    parser.add_argument("--out", default=str(Path(C.RESULTS_DIR) / "precision"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=2, help="repeat with seeds 0..N-1 to see the noise")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    demo = Path(args.demo)
    rows = []
    for seed in range(args.seeds):
        for precision in ["fp32", "bf16"]:
            predictions, references = train_and_caption(demo / "vizwiz", demo / "tiny-blip", precision, device,
                                                         args.steps, seed)
            name = out / f"val_captions_{precision}_seed{seed}.json"
            name.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in predictions.items()]))
            scores, _, tokenizer = score_captions(references, predictions, meteor=False)
            rows.append({"seed": seed, "precision": precision, "CIDEr": scores["CIDEr"], "tokenizer": tokenizer,
                         "file": str(name)})
            print(json.dumps(rows[-1]), flush=True)
    (out / "precision_check.json").write_text(json.dumps({"device": str(device), "steps": args.steps, "runs": rows},
                                                         indent=2))


if __name__ == "__main__":
    main()

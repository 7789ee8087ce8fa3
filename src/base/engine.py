"""The training loop and the captioning pass, shared by full fine-tuning and LoRA.

Read `train` top to bottom: build data, model and optimizer; restore the saved state if the
output directory holds one; then step, evaluate on schedule, keep the best model.
"""
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm
from transformers import get_scheduler

from . import report
from .checkpoint import (Progress, has_training_state, load_training_state, save_best_model,
                         save_training_state)
from .data import (CaptionCollator, CaptionTrainingSet, EpochBatchSampler, ImageSet, ImageTransform,
                   caption_token_ids, collate_images, default_num_workers, load_split, make_loader,
                   with_captions)
from .evaluate import format_scores, score_captions
from .helpers import UserError, log, seed_everything
from .modeling import caption_loss, decoder_token_ids, generate_captions, load_processor, parameter_summary

METRICS_FILE = "metrics.jsonl"


@dataclass
class Method:
    """What differs between full fine-tuning and LoRA: how the model is built and loaded back."""
    name: str                      # "ft" or "peft"
    default_checkpoint: str
    default_lr: float
    build: Callable                # RunConfig -> trainable model, from config.checkpoint
    load_best: Callable            # best_model directory -> model for captioning


# ---------------------------------------------------------------- devices and precision

def pick_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(precision, device):
    """auto = bf16 on GPUs that support it, fp32 otherwise (CPU autocast is slower than fp32 here)."""
    if device.type != "cuda":
        return "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def autocast(precision, device):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def num_workers(config):
    return default_num_workers() if config.num_workers < 0 else config.num_workers


# ---------------------------------------------------------------- captioning (validation and test)

def caption_records(model, records, transform, tokenizer, config, device, precision, desc):
    """Generate one caption per record, batched. Returns ({image_id: caption}, [bad image messages])."""
    loader = make_loader(ImageSet(records, transform), num_workers(config), collate_images,
                         batch_size=config.eval_batch_size)
    model.eval()
    predictions, bad = {}, []
    for batch in tqdm(loader, desc=desc, leave=False, mininterval=_tqdm_interval()):
        for message in batch["bad"]:
            log.warning(f"bad image, captioned as a blank image: {message}")
        bad.extend(batch["bad"])
        with autocast(precision, device):
            captions = generate_captions(model, batch["pixel_values"].to(device), tokenizer, config.num_beams,
                                         config.max_new_tokens, config.min_new_tokens)
        predictions.update(zip(batch["image_ids"], captions))
    return predictions, bad


def validate(model, records, transform, tokenizer, config, device, precision):
    """Caption `records`, score them against their references. Returns (scores, per-image scores, predictions)."""
    predictions, _ = caption_records(model, records, transform, tokenizer, config, device, precision, "validating")
    references = {r.image_id: r.captions for r in records}
    scores, per_image = score_captions(references, predictions, meteor=config.val_meteor)
    return scores, per_image, predictions


# ---------------------------------------------------------------- training

def _tqdm_interval():
    """Redraw often on a terminal, rarely in a batch-job log file."""
    return 0.5 if sys.stderr.isatty() else 60


def _optimizer(model, config):
    """AdamW; no weight decay on biases and normalisation weights (1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    fused = torch.cuda.is_available() and all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=config.lr, fused=fused or None)


def _load_records(config, split):
    records = with_captions(load_split(config.data_dir, split, config.drop_rejected, config.drop_precanned))
    if not records:
        raise UserError(f"{Path(config.data_dir) / 'annotations' / (split + '.json')}: no image has a kept caption")
    return records


def train(method, config):
    output_dir = Path(config.output_dir)
    device = pick_device()
    precision = resolve_precision(config.precision, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(config.seed)

    # ---- data
    train_records = _load_records(config, "train")
    val_records = _load_records(config, "val")
    if config.val_max_images > 0:
        val_records = val_records[: config.val_max_images]
    processor = load_processor(config.checkpoint)
    model = method.build(config).to(device)
    bos, eos, pad = decoder_token_ids(model)
    transform = ImageTransform(processor.image_processor)
    tokens = caption_token_ids(processor.tokenizer, train_records, config.max_caption_tokens, bos, eos)
    train_set = CaptionTrainingSet(train_records, transform, tokens)
    sampler = EpochBatchSampler(len(train_set), config.batch_size, config.seed)
    loader = make_loader(train_set, num_workers(config), CaptionCollator(pad), batch_sampler=sampler)
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    total_steps = config.max_steps if config.max_steps > 0 else config.epochs * steps_per_epoch

    # ---- optimisation
    optimizer = _optimizer(model, config)
    scheduler = get_scheduler(config.lr_schedule, optimizer, num_warmup_steps=int(config.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    progress = Progress()
    if has_training_state(output_dir):
        progress = load_training_state(output_dir, model, optimizer, scheduler, scaler)
        _truncate_metrics(output_dir, progress.step)
        log.info(f"resumed from {output_dir / 'state'} at step {progress.step} "
                 f"(epoch {progress.epoch}, batch {progress.batch_in_epoch}, best CIDEr {progress.best_cider:.4f})")
    log.info(parameter_summary(model))
    log.info(f"{len(train_records)} training images ({sum(len(r.captions) for r in train_records)} captions), "
             f"{len(val_records)} validation images; {steps_per_epoch} steps per epoch, {total_steps} steps in all; "
             f"device {device}, precision {precision}")

    if progress.step >= total_steps:
        log.info(f"nothing to do: the run already reached step {progress.step} of {total_steps}")
        return progress

    def tick():
        """Add the wall time since the last tick to the run's total (training and validation)."""
        nonlocal clock
        progress.elapsed_seconds, clock = progress.elapsed_seconds + time.time() - clock, time.time()

    def evaluate_and_keep_best():
        scores, per_image, predictions = validate(model, val_records, transform, processor.tokenizer, config,
                                                  device, precision)
        tick()
        is_best = scores["CIDEr"] > progress.best_cider
        if is_best:
            progress.best_cider, progress.best_step = scores["CIDEr"], progress.step
            save_best_model(output_dir, model, processor)
            report.save_examples(output_dir / "examples", val_records, predictions, per_image)
        line = {"step": progress.step, "epoch": round(progress.epoch + progress.batch_in_epoch / steps_per_epoch, 4),
                "train_loss": progress.loss_sum / max(progress.loss_count, 1), "lr": scheduler.get_last_lr()[0],
                **scores, "best_CIDEr": progress.best_cider, "is_best": is_best,
                "captions_seen": progress.captions_seen, "images_skipped": progress.images_skipped,
                "elapsed_seconds": round(progress.elapsed_seconds, 1)}
        with open(output_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(line) + "\n")
        report.plot_curves(output_dir / METRICS_FILE, output_dir / "curves.png")
        log.info(f"step {progress.step}: {format_scores(scores)}" + ("  (new best, saved best_model/)" if is_best else ""))
        progress.loss_sum, progress.loss_count, progress.last_eval_step = 0.0, 0, progress.step

    bar = tqdm(total=total_steps, initial=progress.step, desc="training", dynamic_ncols=True,
               mininterval=_tqdm_interval())
    clock = time.time()
    while progress.step < total_steps:
        sampler.set_epoch(progress.epoch, progress.batch_in_epoch)
        for batch in loader:
            for message in batch["bad"]:
                log.warning(f"bad image skipped: {message}")
            progress.images_skipped += len(batch["bad"])
            if batch["num_captions"] > 0:
                loss = _train_step(model, batch, optimizer, scheduler, scaler, config, device, precision)
                progress.step += 1
                progress.loss_sum += loss
                progress.loss_count += 1
                progress.captions_seen += batch["num_captions"]
                bar.update(1)
                bar.set_postfix(loss=f"{progress.loss_sum / progress.loss_count:.4f}")
            progress.batch_in_epoch += 1
            epoch_ended = progress.batch_in_epoch == steps_per_epoch
            if epoch_ended:
                progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0

            finished = progress.step >= total_steps
            eval_due = config.eval_every > 0 and progress.step % config.eval_every == 0
            if progress.step != progress.last_eval_step and (eval_due or epoch_ended or finished):
                evaluate_and_keep_best()
                save_training_state(output_dir, model, optimizer, scheduler, scaler, progress)
            elif config.save_every > 0 and progress.step % config.save_every == 0:
                tick()
                save_training_state(output_dir, model, optimizer, scheduler, scaler, progress)
            if finished:
                break
    bar.close()
    log.info(f"done: best validation CIDEr {progress.best_cider:.4f} at step {progress.best_step}; "
             f"model in {output_dir / 'best_model'}")
    return progress


def _train_step(model, batch, optimizer, scheduler, scaler, config, device, precision):
    model.train()
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    with autocast(precision, device):
        loss = caption_loss(model, batch)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if config.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _truncate_metrics(output_dir, step):
    """Drop metrics lines written after the saved state: the resumed run writes them again."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))


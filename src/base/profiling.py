"""Measure what training costs on this machine: seconds per step, per validation, per save; peak memory;
the largest batch that fits. Used by scripts/estimate.py and by the entry points' --find-batch-size.

Everything here drives the real engine (`Trainer.train_batch`, `Trainer.caption`, the real scoring and
save functions), so what it measures is what a run spends: data loading, host-device copies and
synchronisation included.
"""
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from . import report
from .checkpoint import Progress, save_best_model, save_training_state
from .data import EpochBatchSampler, make_loader
from .engine import Trainer, num_workers
from .evaluate import score_captions
from .helpers import UserError, log
from .precision import full_precision

SEARCH_IMAGES = 16  # distinct images decoded for the batch-size search; bigger batches repeat them


# ---------------------------------------------------------------- clocks and memory

def cpu_seconds():
    """CPU seconds used so far by this process and by its children that have ended (the Java tokenizer). Other work
    on a shared CPU stretches wall time, not these; on one thread they are close to the wall time on an idle CPU."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


CLOCKS = {"wall": time.perf_counter, "cpu": cpu_seconds}
clock = CLOCKS["wall"]  # what `timed` reads; scripts/estimate.py --clock sets it


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(work, device):
    """(seconds, result) of `work()`, with the GPU's queued work finished before and after."""
    synchronize(device)
    start = clock()
    result = work()
    synchronize(device)
    return clock() - start, result


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def release_gpu_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- training steps

def loader_with_batch_size(trainer, batch_size):
    """A loader over the trainer's training set with another number of images per step."""
    sampler = EpochBatchSampler(len(trainer.loader.dataset), batch_size, trainer.config.seed)
    return make_loader(trainer.loader.dataset, num_workers(trainer.config), trainer.loader.collate_fn,
                       batch_sampler=sampler)


def trainable_batches(loader):
    """The loader's batches epoch after epoch, without those whose every image was unreadable."""
    epoch = 0
    while True:
        loader.batch_sampler.set_epoch(epoch)
        yield from (batch for batch in loader if batch["num_captions"] > 0)
        epoch += 1


def time_training_steps(trainer, steps, warmup, loader=None):
    """Mean seconds per optimizer step (loading included) over `steps` steps after `warmup` untimed ones."""
    batches = trainable_batches(loader or trainer.loader)
    for _ in range(warmup):
        trainer.train_batch(next(batches))
    captions = 0

    def train():
        nonlocal captions
        for _ in range(steps):
            batch = next(batches)
            captions += batch["num_captions"]
            trainer.train_batch(batch)

    seconds, _ = timed(train, trainer.device)
    return {"step_seconds": seconds / steps, "captions_per_step": captions / steps}


# ---------------------------------------------------------------- validation and saves

def validation_pass(trainer, records):
    """What a validation of `records` does before its bookkeeping: caption them, then score.
    Returns what the bookkeeping needs: the records, their captions and per-image scores."""
    predictions, _ = trainer.caption(records, "profiling validation")
    references = {r.image_id: r.captions for r in records}
    _, image_scores, _ = score_captions(references, predictions, meteor=trainer.config.val_meteor)
    return records, predictions, image_scores


def time_validation(trainer, batches=3):
    """Seconds of a validation pass as fixed + per_image x images, fitted to passes over one image (the fixed costs:
    a loader, the tokenizer processes, the scorers) and over `batches` eval batches.

    A first, untimed pass over one eval batch pays the one-time costs (GPU kernels, caches) that a run pays once.
    Returns (costs, the larger pass's result for `time_saves`).
    """
    records = trainer.val_records
    large = records[: batches * trainer.config.eval_batch_size]
    validation_pass(trainer, records[: trainer.config.eval_batch_size])
    one_seconds, _ = timed(lambda: validation_pass(trainer, records[:1]), trainer.device)
    large_seconds, last_pass = timed(lambda: validation_pass(trainer, large), trainer.device)
    per_image = max(0.0, large_seconds - one_seconds) / max(len(large) - 1, 1)
    costs = {"validation_fixed_seconds": max(0.0, large_seconds - per_image * len(large)),
             "validation_seconds_per_image": per_image, "validation_images_timed": len(large)}
    return costs, last_pass


def time_saves(trainer, last_pass):
    """Seconds of a training-state save, and of what a validation writes when it finds a new best
    (best_model/, example images, curves); the first such write also pays one-time imports."""
    with tempfile.TemporaryDirectory() as tmp, full_precision(trainer.master):  # as the Trainer saves them
        tmp = Path(tmp)
        state_seconds, _ = timed(lambda: save_training_state(tmp, trainer.model, trainer.optimizer, trainer.scheduler,
                                                             trainer.scaler, Progress(), trainer.config), trainer.device)
        (tmp / "metrics.jsonl").write_text(json.dumps({"step": 1, "train_loss": 1.0, "CIDEr": 0.5}) + "\n")

        def write_best():
            save_best_model(tmp, trainer.model, trainer.family, trainer.config)
            report.save_examples(tmp / "examples", *last_pass)
            report.plot_curves(tmp / "metrics.jsonl", tmp / "curves.png")

        first_seconds, _ = timed(write_best, trainer.device)
        best_seconds, _ = timed(write_best, trainer.device)
    return {"state_save_seconds": state_seconds, "best_save_seconds": best_seconds,
            "first_validation_extra_seconds": max(0.0, first_seconds - best_seconds)}


# ---------------------------------------------------------------- the largest batch that fits

def largest_batch_that_fits(try_batch, start):
    """The first of start, start/2, start/4, ... for which `try_batch(size)` runs without running out of memory.

    accelerate's find_executable_batch_size does the retrying (and knows which errors mean out of memory);
    its default shrinks by 10% a try, we halve as its earlier versions did: fewer tries, each a full step.
    """
    from accelerate.utils import find_executable_batch_size

    tried = []

    def attempt(size):
        tried.append(size)
        try_batch(size)
        return size

    def halve():
        log.info(f"{tried[-1]} images per step ran out of memory; trying {tried[-1] // 2}")
        return tried[-1] // 2

    try:
        return find_executable_batch_size(attempt, starting_batch_size=start, reduce_batch_size_fn=halve)()
    except RuntimeError as error:
        if tried and "reached zero" in str(error):
            raise UserError("not even one image per step fits in this GPU's memory with this model and precision")
        raise


def search_samples(trainer, count):
    """Decoded training items for the search: those of the images with the most captions (the costliest steps)."""
    dataset = trainer.loader.dataset
    by_captions = sorted(range(len(dataset)), key=lambda i: -len(trainer.train_records[i].captions))
    samples = []
    for index in by_captions:
        sample = dataset[index]
        if "bad" not in sample:
            samples.append(sample)
        if len(samples) == count:
            break
    if not samples:
        raise UserError(f"{trainer.config.data_dir}: no readable training image to search a batch size with")
    return samples


def padded_to(batch, length, pad_token_id):
    """The batch with every caption `length` tokens long, as long as --max-caption-tokens lets one be: the padding
    is attended to (so that splitting into micro-batches keeps it) but not scored."""
    extra = length - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    pad = torch.nn.functional.pad
    return {**batch, "input_ids": pad(batch["input_ids"], (0, extra), value=pad_token_id),
            "attention_mask": pad(batch["attention_mask"], (0, extra), value=1),
            "labels": pad(batch["labels"], (0, extra), value=-100)}


def largest_batch_on(trainer, start):
    """The most images per step (start, start/2, ...) with which `trainer` takes one step without running out of
    memory, tried on worst-case batches: the images with the most captions, each caption at the longest allowed."""
    samples = search_samples(trainer, min(start, SEARCH_IMAGES))
    pad_token_id = trainer.family.pad_id

    def try_batch(size):
        trainer.optimizer.zero_grad(set_to_none=True)  # a failed try can leave gradients behind
        batch = trainer.loader.collate_fn([samples[i % len(samples)] for i in range(size)])
        trainer.train_batch(padded_to(batch, trainer.config.max_caption_tokens, pad_token_id))
        synchronize(trainer.device)

    return largest_batch_that_fits(try_batch, start)


def find_batch_size(method, config, start=None):
    """The most images per step (start or config.batch_size, halved on each out-of-memory error) that train one
    step on this GPU. On the CPU there is no out-of-memory error to catch: returns the start value."""
    start = start or config.batch_size
    if not torch.cuda.is_available():
        log.info(f"the batch-size search needs a GPU (it looks for out-of-memory errors); keeping {start} images "
                 f"per step")
        return start
    trainer = Trainer(method, config)
    size = largest_batch_on(trainer, start)
    del trainer
    release_gpu_memory()
    log.info(f"largest batch that fits: {size} images per step")
    return size

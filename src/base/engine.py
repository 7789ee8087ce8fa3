"""The training loop and the captioning pass, shared by full fine-tuning and LoRA.

Read `Trainer` top to bottom: __init__ builds data, model and optimizer (and writes nothing);
`run` restores the saved state if the output directory holds one, then steps, validates on
schedule, keeps the best model, and saves the full state often enough that a kill loses little.
"""
import json
import math
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers import get_scheduler

from . import constants as C
from . import decoding, ocr, report
from .budget import TimeBudget, format_duration
from .checkpoint import (Progress, clear_run, has_training_state, load_training_state, save_best_model,
                         save_training_state)
from .data import (CaptionCollator, CaptionTrainingSet, EpochBatchSampler, ImageSet, ImageTransform,
                   collate_images, default_num_workers, load_split, make_loader, training_records, with_captions)
from .distributed import Processes
from .evaluate import format_scores, score_captions
from .families import apply_recipe, load_family
from .helpers import UserError, log, process_seed, rng_state, seed_everything
from .jobs import RunLock, StopSignals, current_job
from .modeling import enable_activation_checkpointing, parameter_summary, to_device
from .objectives import make_objective
from .progress import ProgressBar
from .precision import MasterWeights, autocast, describe_weights, full_precision, resolve_precision, set_tf32

METRICS_FILE = "metrics.jsonl"
EXIT_STOPPED = 99     # stopped by a signal or --time-limit, state saved; SGE requeues a job that exits with 99
EXIT_NONFINITE = 3    # too many non-finite losses in a row; the last good state is kept


@dataclass
class Method:
    """What differs between full fine-tuning and LoRA: how the model is built and loaded back."""
    name: str                      # "ft" or "peft"
    title: str                     # what it does, for the log: "full fine-tuning", "LoRA"
    default_checkpoint: str
    default_lr: float
    build: Callable                # (RunConfig, Family) -> trainable model, from config.checkpoint
    load_best: Callable            # best_model directory -> model for captioning
    recipe_keys: dict = field(default_factory=dict)  # RunConfig field -> its key in Family.recipe, where they differ


# ---------------------------------------------------------------- devices and precision

def peak_memory_gb(device):
    """Peak GPU memory allocated by this process, or its peak resident memory on the CPU, in GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def describe_run(what, checkpoint, config, family, device, precision, processes=1):
    """The first line of a run's log: what runs, from which model, on which data, where it writes, on what."""
    job = current_job()
    return (f"{what} | {family.name} {checkpoint} | data {config.data_dir} | output {config.output_dir} | "
            f"device {device_name(device)}" + (f" x {processes} processes" if processes > 1 else "")
            + f" | precision {precision}" + (f" | job {job}" if job else ""))


def num_workers(config):
    return default_num_workers() if config.num_workers < 0 else config.num_workers


# ---------------------------------------------------------------- captioning (validation and test)

class Interrupted(Exception):
    """A stop signal (or the time limit) cut a captioning pass short."""


def decoding_settings(config):
    """The generate() settings of validation and test captions."""
    return {key: getattr(config, key) for key in decoding.GENERATE_KEYS}


def draw_candidates(model, pixel_values, prefixes, family, config):
    """Each image's candidate captions, [{"caption", "source"}], best beam first: the beam search's n-best (all
    --num-beams of them: returning them costs nothing more than the beam search itself), or with --mbr N the
    min(N, --num-beams) best beams and N minus that many samples drawn at temperature MBR_TEMPERATURE. The beams
    are the model's strongest guesses, the samples the spread of what it might say: consensus over the pool can
    only replace the top beam by a caption the samples agree with more (see consensus.py).
    Returns them with how many images' best beams reached --max-new-tokens before their end token (cut short)."""
    beams = min(config.mbr, config.num_beams) if config.mbr else config.num_beams
    sequences, prefix_lengths = family.generate_from(model, pixel_values, prefixes, num_return_sequences=beams,
                                                     **decoding_settings(config))
    captions = family.decode(sequences, prefix_lengths)
    cut = sum(family.cut_short(sequences[::beams], None if prefix_lengths is None else prefix_lengths[::beams]))
    drawn = [[{"caption": c, "source": "beam"} for c in captions[i * beams: (i + 1) * beams]]
             for i in range(pixel_values.shape[0])]
    samples = config.mbr - beams if config.mbr else 0
    if samples > 0:
        sampled = family.decode(*family.sample_from(model, family.encode_images(model, pixel_values), prefixes, samples,
                                                    config.max_new_tokens, temperature=C.MBR_TEMPERATURE))
        for i, image in enumerate(drawn):
            image += [{"caption": c, "source": "sample"} for c in sampled[i * samples: (i + 1) * samples]]
    return drawn, cut


def caption_records(model, records, transform, family, config, device, precision, desc, stop=None, rounds=None,
                    candidates=False):
    """Caption each record (its best beam), batched. Returns ({image_id: caption}, [bad image messages]); with
    `candidates`, {image_id: [candidates]} (draw_candidates) instead of a caption. Logs how many captions were cut
    short by --max-new-tokens.

    `stop`, if given, is asked before each batch; a true answer raises Interrupted. `rounds`: ask it this many times
    in all, batches or not (with several processes it is a collective question, asked as often by each of them).
    A bad image is captioned as a blank one (so a submission covers every id), unless --strict.
    """
    loader = make_loader(ImageSet(records, transform, ocr.prefixes(family, records, config)), num_workers(config),
                         collate_images, batch_size=config.eval_batch_size)
    model.eval()
    predictions, bad, cut_short = {}, [], 0
    batches = iter(loader)
    with ProgressBar(len(records), desc, "image", leave=False) as bar:
        for _ in range(max(rounds or 0, len(loader))):
            if stop is not None and stop():
                raise Interrupted
            batch = next(batches, None)
            if batch is None:  # this process's share is done; the others still ask `stop`
                continue
            for message in batch["bad"]:
                if config.strict:
                    raise UserError(f"{message} (--strict)")
                log.warning(f"bad image, captioned as a blank image: {message}")
            bad.extend(batch["bad"])
            pixel_values = batch["pixel_values"].to(device, non_blocking=True)
            with autocast(precision, device):
                drawn, cut = draw_candidates(model, pixel_values, batch["prefixes"], family, config)
            predictions.update(zip(batch["image_ids"], drawn if candidates else [d[0]["caption"] for d in drawn]))
            cut_short += cut
            bar.update(len(batch["image_ids"]))
    if cut_short:  # VizWiz's references run longer than COCO's, for which the recipes' caps were set
        log.info(f"{desc}: {cut_short} of {len(records)} captions reached --max-new-tokens {config.max_new_tokens} "
                 f"before their end token and were cut short ({cut_short / len(records):.1%}; test --tune-decoding "
                 f"tries longer caps)")
    return predictions, bad


def caption_in_shares(processes, model, records, transform, family, config, device, precision, desc, stop=None,
                      candidates=False):
    """caption_records over this process's share of `records`; every process gets all the captions.

    With several processes `stop` must be a collective question (every process gets the same answer): each asks
    it as often as the process with the most batches, so that they all stop at the same point.
    """
    largest_share = math.ceil(len(records) / processes.world)
    predictions, bad = caption_records(model, processes.shard(records), transform, family, config, device,
                                       precision, desc, stop, rounds=math.ceil(largest_share / config.eval_batch_size),
                                       candidates=candidates)
    if processes.world > 1:
        predictions, bad = dict(processes.gather(list(predictions.items()))), processes.gather(bad)
    return predictions, bad


# ---------------------------------------------------------------- training

def _load_records(config, split):
    records = with_captions(load_split(config.data_dir, split, config.drop_rejected, config.drop_precanned))
    if config.ocr:
        ocr.attach_ocr(records, config.data_dir, split, config.ocr_min_confidence)
    if split == "train":
        records = training_records(records)  # empty captions count as references in scoring, not in training
    if not records:
        raise UserError(f"{Path(config.data_dir) / 'annotations' / (split + '.json')}: no image has a kept caption")
    return records


def _optimizer(params, config):
    """AdamW over `params` (the trainable weights, or their fp32 master copies); no weight decay on biases and
    normalisation weights (1-D tensors)."""
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=config.lr, fused=fused or None)


class LossModule(torch.nn.Module):
    """The captioner with an objective's loss as forward(): the module DDP wraps, so that it syncs the gradients."""

    def __init__(self, captioner):
        super().__init__()
        self.captioner = captioner

    def forward(self, objective, batch):
        return objective.loss(self.captioner, batch)


def micro_batches(batch, parts):
    """Split a training batch by images into `parts` smaller ones (fewer if it has fewer images); each image
    keeps all its captions, and each part is padded only to its own longest caption."""
    num_images = batch["pixel_values"].shape[0]
    parts = max(1, min(parts, num_images))
    if parts == 1:
        return [batch]
    sizes = [num_images // parts + (i < num_images % parts) for i in range(parts)]
    caption_ends = [0] + batch["captions_per_image"].cumsum(0).tolist()
    result, first = [], 0
    for size in sizes:
        last = first + size
        rows = slice(caption_ends[first], caption_ends[last])
        longest = int(batch["attention_mask"][rows].sum(1).max())
        result.append({"pixel_values": batch["pixel_values"][first:last],
                       "captions_per_image": batch["captions_per_image"][first:last],
                       "input_ids": batch["input_ids"][rows, :longest],
                       "attention_mask": batch["attention_mask"][rows, :longest],
                       "labels": batch["labels"][rows, :longest],
                       "image_ids": batch["image_ids"][first:last],
                       "num_captions": rows.stop - rows.start, "bad": []})
        first = last
    return result


def training_step(model, batch, optimizer, scheduler, scaler, precision, device, max_grad_norm,
                  objective, grad_accum=1, processes=None, master=None):
    """Forward and backward in `grad_accum` micro-batches, clip, update. Returns (loss, updated).

    `model` is a LossModule (DDP-wrapped when there are several processes). Each micro-batch's mean
    loss is weighted by its share of the step's units (caption tokens, or SCST samples) over all
    processes, so the gradient, and the loss reported, are those of the whole batch at once.
    `updated` is False when nothing changed: the loss returned is then NaN if the loss or the gradient
    is not finite, and the (finite) loss if the fp16 loss scaler skipped the step because its scaled
    gradients overflowed (it then halves its scale); an overflow at a scale of 1 or less is a
    non-finite gradient, not the scaler's search for a scale that fits fp16.
    With `master` (MasterWeights, --precision bf16-weights) the optimizer steps the fp32 copies: the gradients
    move there before clipping, and the updated weights come back to the model after the step.
    """
    world = processes.world if processes else 1
    model.train()
    parts = micro_batches(batch, grad_accum)
    units = [0 if part.get("stand_in") else objective.units(part) for part in parts]
    total_units = processes.sum([sum(units)])[0] if processes else sum(units)
    loss_sum = torch.zeros((), device=device)
    for i, (part, part_units) in enumerate(zip(parts, units)):
        part = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in part.items()}
        last = i == len(parts) - 1
        with processes.no_sync(model, skip=not last) if processes else nullcontext():
            with autocast(precision, device):
                loss = model(objective, part) * (part_units * world / total_units)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += loss.detach().float()
    loss_value = loss_sum.item()
    if processes:
        loss_value = processes.sum([loss_value])[0] / world
    if scaler is not None:
        scaler.unscale_(optimizer)
    if master is not None:
        master.gradients_to_master()
    trainable = [q for group in optimizer.param_groups for q in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm or float("inf"))
    if not math.isfinite(loss_value) or (scaler is None and not torch.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()
        return float("nan"), False
    if scaler is not None:
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        if scaler.get_scale() < scale:  # it skipped optimizer.step(): skip the schedule too
            optimizer.zero_grad(set_to_none=True)
            return (loss_value if scale > 1 else float("nan")), False
    else:
        optimizer.step()
    if master is not None:
        master.master_to_model()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, True


class Trainer:
    def __init__(self, method, config, fresh=False, time_limit=None, stop=None):
        """`time_limit`: seconds from the process's start (--time-limit), or None. `stop`: the StopSignals of the
        entry point, installed before the model loads (run() installs its own otherwise)."""
        self.config, self.fresh = config, fresh
        self.stop = stop or StopSignals()  # the signals this process received
        self.stopping = None  # what the processes agreed to stop for (_agree_on_stop)
        self.budget = TimeBudget(time_limit)
        self.saved_at = None  # where the last state save was: a stop for time right after it need not save again
        self.output_dir = Path(config.output_dir)
        self.processes = Processes()  # one, or several under accelerate launch / torchrun
        self.device = self.processes.device
        self.precision = resolve_precision(config.precision, self.device)
        set_tf32(self.precision, config.tf32, self.device)
        seed_everything(config.seed)  # the same on every process: the same initial model (LoRA's too)
        # data: every kept caption of every training image, each epoch (read first: no data, nothing else matters)
        self.train_records = _load_records(config, "train")
        self.val_records = _load_records(config, "val")
        if config.val_max_images > 0:
            self.val_records = self.val_records[: config.val_max_images]
        recipe = apply_recipe(config, method, config.checkpoint)  # before the family: the prompt is one of them
        self.family = load_family(config.checkpoint, config.prompt)
        self.processor = self.family.processor
        objective = "self-critical training" if config.objective == "scst" else "cross-entropy training"
        log.info(describe_run(f"src.{method.name}.train: {method.title}, {objective}", config.checkpoint, config,
                              self.family, self.device, self.precision, self.processes.world))
        for line in recipe:
            log.info(line)
        model = method.build(config, self.family)
        self.family.use_image_size(model, config.image_size)  # before the optimizer: it may replace a parameter
        self.model = to_device(model, self.device)
        if config.grad_checkpointing:
            enable_activation_checkpointing(self.model)
        # bf16-weights: the model's weights become bf16, the optimizer steps fp32 copies (before compile and DDP)
        self.master = MasterWeights(self.model) if self.precision == "bf16-weights" else None
        log.info(describe_weights(self.model, self.precision))
        self.objective = make_objective(config, self.train_records, self.family)
        loss_model = LossModule(self.model)
        if config.compile:  # the training loss only (caption lengths vary: dynamic shapes); generation runs eagerly
            loss_model.compile(dynamic=True, backend=C.COMPILE_BACKEND)
        self.loss_model = self.processes.wrap(loss_model)
        if self.processes.rank > 0:  # its own dropout masks and SCST samples; rank 0 goes on as one process would
            seed_everything(process_seed(config.seed, self.processes.rank))
        self.transform = ImageTransform(self.processor.image_processor, use_draft=not config.exact_preprocessing)
        prefixes = ocr.prefixes(self.family, self.train_records, config)
        tokens = [self.family.training_sequences(r.captions, config.max_caption_tokens, prefixes and prefixes[i])
                  for i, r in enumerate(self.train_records)]
        train_set = CaptionTrainingSet(self.train_records, self.transform, tokens, prefixes)
        self.sampler = EpochBatchSampler(len(train_set), config.batch_size, config.seed,
                                         self.processes.rank, self.processes.world)
        self.loader = make_loader(train_set, num_workers(config), CaptionCollator(self.family.pad_id, len(self.family.prefix)),
                                  batch_sampler=self.sampler)
        self.steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
        self.total_steps = config.max_steps if config.max_steps > 0 else config.epochs * self.steps_per_epoch

        # optimisation
        self.optimizer = _optimizer(self.master.parameters() if self.master else
                                    [q for q in self.model.parameters() if q.requires_grad], config)
        self.scheduler = get_scheduler(config.lr_schedule, self.optimizer,
                                       num_warmup_steps=int(config.warmup_ratio * self.total_steps),
                                       num_training_steps=self.total_steps)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.progress = Progress()

    # ---- the run

    def run(self):
        """Train to the end (exit status 0), or until a signal (EXIT_STOPPED) or a non-finite streak (EXIT_NONFINITE).

        Rank 0 holds the run directory's lock throughout: a second run there is refused before it writes anything."""
        if not self.budget.fits():  # before writing anything; requeued, the job would only stop again
            raise UserError(f"--time-limit {format_duration(self.budget.limit)}: no time left after the startup for "
                            f"even one state save; give the job more time")
        lock = RunLock(self.output_dir) if self.processes.is_main else None
        with self.stop:
            try:
                if lock:
                    self.output_dir.mkdir(parents=True, exist_ok=True)
                    lock.acquire()
                return self._run()
            finally:
                if lock:
                    lock.release()

    def _run(self):
        p = self.progress
        if self.processes.is_main and self.fresh:
            clear_run(self.output_dir)
        self.processes.wait()
        resuming = has_training_state(self.output_dir)
        if resuming:  # read before anything is written: a damaged state leaves the run directory as it was
            with full_precision(self.master):  # bf16-weights: the saved fp32 weights fill the master copies
                self.progress = p = load_training_state(self.output_dir, self.model, self.optimizer, self.scheduler,
                                                        self.scaler, self.processes.rank)
        if self.processes.is_main:
            self.config.save()
            if resuming:
                _truncate_metrics(self.output_dir, p.step)
        if resuming:
            log.info(f"resumed from {self.output_dir / 'state'} at step {p.step} (epoch {p.epoch}, "
                     f"batch {p.batch_in_epoch}, best CIDEr {p.best_cider:.4f})")
        log.info(parameter_summary(self.model))
        log.info(f"{len(self.train_records)} training images "
                 f"({sum(len(r.captions) for r in self.train_records)} captions), {len(self.val_records)} validation "
                 f"images; {self.steps_per_epoch} steps per epoch, {self.total_steps} steps in all; "
                 f"device {self.device}" + (f" x {self.processes.world} processes" if self.processes.world > 1 else "") +
                 f", precision {self.precision}, objective {self.objective.name}"
                 + (f", {self.config.grad_accum} micro-batches per step" if self.config.grad_accum > 1 else ""))
        if self._finished() and not p.eval_pending:
            log.info(f"nothing to do: the run already reached step {p.step} of {self.total_steps}")
            return 0
        self._agree_on_stop()
        if self.stopping:  # while the run was starting: the state on disk is as it was
            log.info(f"received {self.stopping} before the first step: nothing new to save; exiting with "
                     f"status {EXIT_STOPPED}. Resubmit the same command (or run src.<method>.resume) to continue.")
            return EXIT_STOPPED
        if p.step == 0 and p.last_eval_step < 0 and self.config.eval_at_start:
            p.eval_pending = True  # score the starting model first: best_model/ never falls below it
            log.info("validating the starting model first (step 0; --no-eval-at-start skips this)")

        self.clock = self.last_save = time.time()
        self.budget.start_lap()
        with ProgressBar(self.total_steps, "training", "step", initial=p.step,
                         enabled=self.processes.is_main) as self.bar:
            status = self._validate() if p.eval_pending else None  # a validation a signal cut short
            while status is None and not self._finished():
                self.sampler.set_epoch(p.epoch, p.batch_in_epoch)
                for batch in self.loader:
                    status = self._consume(batch)
                    if status is not None or self._finished():
                        break
        self.processes.wait()  # no process exits before rank 0 has finished its last save
        if status is not None:
            return status
        if self.processes.is_main:  # only rank 0 validates: the others do not know the best score
            state = self.output_dir / "state"
            size = sum(f.stat().st_size for f in state.rglob("*") if f.is_file()) / 1e9
            log.info(f"done: best validation CIDEr {p.best_cider:.4f} at step {p.best_step}; model in "
                     f"{self.output_dir / 'best_model'}. {state}/ ({size:.2f} GB) is needed only to resume this run"
                     f": delete it with rm -r {state}")
        return 0

    def _finished(self):
        p = self.progress
        return p.step >= self.total_steps or (self.config.max_steps <= 0 and p.epoch >= self.config.epochs)

    def _consume(self, batch):
        """One batch: a training step, then validation or a state save when due. Returns an exit status to stop."""
        p = self.progress
        # with several processes, all must agree on what the batch held (and later, on saving and stopping);
        # a stand-in image is another process's, counted there
        own = not batch.get("stand_in")
        captions, images, empty, bad = self.processes.sum([batch["num_captions"] * own,
                                                           len(batch.get("image_ids", [])) * own,
                                                           batch["num_captions"] == 0, len(batch["bad"])])
        if bad:
            self._note_bad_images(self.processes.gather(batch["bad"]))
        stepped = False
        if not empty:  # else every image of the batch (of some process) was unreadable
            stepped = self._step(batch, int(captions), int(images))
            if not stepped and p.nonfinite_in_a_row >= C.MAX_NONFINITE_IN_A_ROW:
                log.error(f"stopping: {p.nonfinite_in_a_row} non-finite losses in a row (lower --lr, or try "
                          f"--precision fp32); the last good state is in {self.output_dir / 'state'}")
                return EXIT_NONFINITE
        self.budget.lap("step")
        p.batch_in_epoch += 1
        epoch_ended = p.batch_in_epoch == self.steps_per_epoch
        if epoch_ended:
            p.epoch, p.batch_in_epoch = p.epoch + 1, 0

        eval_due = stepped and self.config.eval_every > 0 and p.step % self.config.eval_every == 0
        if p.step != p.last_eval_step and (eval_due or epoch_ended or self._finished()):
            p.eval_pending = True
            return self._validate() or self._stop_if_out_of_time("step")
        save_due = stepped and self.config.save_every > 0 and p.step % self.config.save_every == 0
        (save_by_clock,) = self._agree_on_stop(time.time() - self.last_save > 60 * self.config.save_every_minutes)
        if save_due or save_by_clock or self.stopping:
            self._save_state()
        return self._stop_if_signalled() or self._stop_if_out_of_time("step")

    def train_batch(self, batch):
        """One optimizer update on a loader batch, no bookkeeping. Returns (loss, updated)."""
        return training_step(self.loss_model, batch, self.optimizer, self.scheduler, self.scaler, self.precision,
                             self.device, self.config.max_grad_norm, self.objective, self.config.grad_accum,
                             self.processes, self.master)

    def caption(self, records, desc="captioning"):
        """({image_id: caption}, [bad image messages]) for `records`, with the model as it is now."""
        return caption_in_shares(self.processes, self.model, records, self.transform, self.family,
                                 self.config, self.device, self.precision, desc, self._stop_captioning)

    def _stop_captioning(self):
        """Asked before each validation batch, by every process together: a stop signal (to any of them), or only
        the final save's time left (the first validation has no measured length to check against beforehand)."""
        (out_of_time,) = self._agree_on_stop(not self.budget.fits())
        return bool(self.stopping) or out_of_time > 0

    def _step(self, batch, captions, images):
        """One update and its bookkeeping. Returns False when it was skipped for a non-finite loss or gradient."""
        p = self.progress
        loss, updated = self.train_batch(batch)
        if not updated and math.isfinite(loss):  # not a fault: the fp16 loss scaler lowered its scale
            p.scaler_skips += 1
            log.info(f"fp16 gradients overflowed after step {p.step}: update skipped, loss scale lowered to "
                     f"{self.scaler.get_scale():g}")
            return False
        if not updated:
            p.nonfinite_in_a_row += 1
            p.nonfinite_total += 1
            log.warning(f"non-finite loss or gradient after step {p.step}: update skipped "
                        f"({p.nonfinite_in_a_row} in a row, {p.nonfinite_total} in all)")
            return False
        p.step += 1
        p.nonfinite_in_a_row = 0
        p.loss_sum += loss
        p.loss_count += 1
        p.captions_seen += captions
        p.images_seen += images
        self.bar.update(1)
        self.bar.set_postfix(f"loss {p.loss_sum / p.loss_count:.4f}")
        return True

    def _note_bad_images(self, messages):
        for message in messages:
            if self.config.strict:
                raise UserError(f"{message} (--strict)")
            if message not in self.progress.bad_images:
                self.progress.bad_images.append(message)
                log.warning(f"bad image skipped: {message}")

    # ---- validation, best model, state

    def _validate(self):
        """Caption and score the validation set; keep best_model/; append to metrics.jsonl; save the state."""
        p = self.progress
        status = self._stop_if_out_of_time("validation")  # eval_pending is saved: the resumed run validates first
        if status is not None:
            return status
        self._tick()
        train_seconds = p.elapsed_seconds - p.elapsed_at_last_eval  # since the previous validation
        log.info(f"step {p.step}: validating on {len(self.val_records)} images")
        try:
            with self.budget.measure("validation"):
                predictions, _ = self.caption(self.val_records, "validating")
                train_stats = self.objective.take_stats(self.processes)  # every process: SCST rewards are summed
                if self.processes.is_main:  # the others wait for it at the next step
                    self._score_and_record(predictions, train_seconds, train_stats)
        except Interrupted:
            if not self.stopping:
                return self._stop_if_out_of_time(None)
            self._save_state()
            return self._stop_if_signalled()
        p.loss_sum, p.loss_count, p.last_eval_step, p.eval_pending = 0.0, 0, p.step, False
        p.bad_images_reported = len(p.bad_images)
        p.captions_at_last_eval, p.elapsed_at_last_eval = p.captions_seen, p.elapsed_seconds
        self._agree_on_stop()
        self._save_state()
        return self._stop_if_signalled()

    def _score_and_record(self, predictions, train_seconds, train_stats):
        """Score the validation captions, keep the best model, append a line to metrics.jsonl."""
        p, config = self.progress, self.config
        references = {r.image_id: r.captions for r in self.val_records}
        scores, per_image, tokenizer = score_captions(references, predictions, meteor=config.val_meteor)
        self._tick()
        is_best = scores["CIDEr"] > p.best_cider and self._save_best(predictions, per_image)
        if is_best:
            p.best_cider, p.best_step = scores["CIDEr"], p.step
        line = {"step": p.step, "epoch": round(p.epoch + p.batch_in_epoch / self.steps_per_epoch, 4),
                "train_loss": p.loss_sum / p.loss_count if p.loss_count else None, "lr": self.scheduler.get_last_lr()[0],
                **train_stats, **scores, "val_images": len(references), "best_CIDEr": p.best_cider,
                "is_best": is_best,
                "captions_seen": p.captions_seen, "images_seen": p.images_seen,
                "images_skipped": len(p.bad_images), "bad_images_new": p.bad_images[p.bad_images_reported:],
                "nonfinite_steps": p.nonfinite_total, "scaler_skips": p.scaler_skips, "tokenizer": tokenizer,
                # compute spent, so that runs can be compared by score per GPU-hour
                "elapsed_seconds": round(p.elapsed_seconds, 1),
                "train_captions_per_second": round((p.captions_seen - p.captions_at_last_eval) / max(train_seconds, 1e-9), 2),
                "val_seconds": round(p.elapsed_seconds - p.elapsed_at_last_eval - train_seconds, 1),
                "peak_memory_gb": round(peak_memory_gb(self.device), 3), "device": device_name(self.device),
                "num_processes": self.processes.world,
                "device_hours": round(p.elapsed_seconds * self.processes.world / 3600, 5)}
        with open(self.output_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(line) + "\n")
        report.plot_curves(self.output_dir / METRICS_FILE, self.output_dir / "curves.png")
        log.info(f"step {p.step}{' (the starting model)' if p.step == 0 else ''}: {format_scores(scores)}"
                 + ("  (new best, saved best_model/)" if is_best else "")
                 + (f"  mean sampled reward {line['train_reward']:.4f}" if line.get("train_reward") is not None else ""))

    def _save_best(self, predictions, per_image):
        try:
            with full_precision(self.master):  # bf16-weights: written from the fp32 copies, an fp32 model
                save_best_model(self.output_dir, self.model, self.family, self.config)
        except OSError as error:
            log.error(f"could not save {self.output_dir / 'best_model'} ({error}); the previous best model is kept "
                      f"and the next validation tries again")
            return False
        report.save_examples(self.output_dir / "examples", self.val_records, predictions, per_image)
        return True

    def _save_state(self):
        self._tick()
        self.last_save = time.time()  # after a failure too: retry at the next due save, not every batch
        p = self.progress
        self.saved_at = (p.step, p.epoch, p.batch_in_epoch, p.eval_pending)  # the same on every process
        rng_states = self.processes.gather([rng_state()])  # every process's: a resumed run replays each one
        if not self.processes.is_main:
            return
        try:
            with self.budget.measure("save"), full_precision(self.master):  # --time-limit keeps time for one more
                save_training_state(self.output_dir, self.model, self.optimizer, self.scheduler, self.scaler,
                                    self.progress, self.config, rng_states)
        except OSError as error:
            log.error(f"could not save the training state to {self.output_dir / 'state'} ({error}); "
                      f"the previous state is kept")

    def _stop_if_out_of_time(self, work):
        """Save and stop (EXIT_STOPPED) if `work` (the next 'step' or 'validation'; None: the rest of this one) and
        a final state save would not fit in --time-limit; the processes decide together. Else None."""
        p = self.progress
        if self.budget.deadline is None or (work == "step" and self._finished()):
            return None
        (out_of_time,) = self.processes.sum([not self.budget.fits(work)])
        if not out_of_time:
            return None
        why = self.budget.describe(work)
        if self.saved_at != (p.step, p.epoch, p.batch_in_epoch, p.eval_pending):
            self._save_state()
        log.info(f"stopping for the time limit: {why}; state saved at step {p.step} in {self.output_dir / 'state'}; "
                 f"exiting with status {EXIT_STOPPED} (SGE requeues the job). Resubmit the same command (or run "
                 f"src.{self.config.method}.resume) to continue.")
        return EXIT_STOPPED

    def _agree_on_stop(self, *values):
        """Sum `values` over the processes, and decide together whether to stop: one signalled process stops them
        all at the same point. Every decision reads the agreed `self.stopping`, never the signal flag itself: a
        signal that lands on one process just after an agreement would otherwise send that process alone into a
        save or out of a validation, and leave the others waiting for it in a collective operation forever."""
        *totals, stop = self.processes.sum([*values, bool(self.stop.received)])
        if stop and not self.stopping:
            self.stopping = self.stop.received or "a stop signal sent to another process"
        return totals

    def _stop_if_signalled(self):
        if not self.stopping:
            return None
        log.info(f"received {self.stopping}: state saved at step {self.progress.step} in "
                 f"{self.output_dir / 'state'}; exiting with status {EXIT_STOPPED}. Resubmit the same command "
                 f"(or run src.<method>.resume) to continue.")
        return EXIT_STOPPED

    def _tick(self):
        """Add the wall time since the last tick to the run's total (training and validation)."""
        now = time.time()
        self.progress.elapsed_seconds += now - self.clock
        self.clock = now


def _truncate_metrics(output_dir, step):
    """Drop metrics lines written after the saved state: the resumed run writes them again."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))

"""A run's configuration: constants (or their environment variables) < the saved run < command-line flags."""
import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from . import constants as C
from .cli import ArgumentParser
from .helpers import UserError, write_json_atomic
from .precision import PRECISIONS

CONFIG_FILE = "config.json"


@dataclass
class RunConfig:
    method: str
    data_dir: str
    output_dir: str
    checkpoint: str
    epochs: int
    max_steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_ratio: float
    lr_schedule: str
    max_grad_norm: float
    precision: str
    seed: int
    eval_every: int
    save_every: int
    save_every_minutes: float
    eval_batch_size: int
    num_beams: int
    max_new_tokens: int
    min_new_tokens: int
    max_caption_tokens: int
    num_workers: int
    drop_rejected: bool
    drop_precanned: bool
    val_max_images: int
    val_meteor: bool
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_targets: str
    strict: bool
    objective: str = "xe"
    grad_accum: int = 1
    grad_checkpointing: bool = False
    compile: bool = False
    scst_samples: int = 5
    scst_temperature: float = 1.0
    scst_baseline: str = "mean"
    label_smoothing: float = 0.0
    prompt: str = ""
    ocr: bool = False
    ocr_min_confidence: float = 0.5
    ocr_max_tokens: int = 12
    eval_at_start: bool = True
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    exact_preprocessing: bool = False
    tf32: bool = False
    mbr: int = 0  # test only: candidates per image for consensus decoding (0 = beam search); training ignores it
    image_size: int = None  # pixels, square: the family's recipe (the checkpoint's own; BLIP-2's ViT-g: 364)
    train_modules: str = None  # src.ft: the parts that train ("all": every weight); src.peft: parts trained besides LoRA
    job: str = None  # the batch job that started the run (jobs.current_job()): its requeues resume, even with --fresh

    def save(self):
        write_json_atomic(Path(self.output_dir) / CONFIG_FILE, dataclasses.asdict(self))


def defaults(method):
    """The run configuration from src/base/constants.py alone; the RECIPE settings no constant sets are None (the
    family's recipe fills them once the checkpoint's family is known: apply_recipe)."""
    return dict(
        method=method.name, data_dir=C.DATA_DIR, output_dir=str(Path(C.RESULTS_DIR) / method.name),
        checkpoint=method.default_checkpoint, epochs=C.EPOCHS, max_steps=C.MAX_STEPS, batch_size=C.BATCH_SIZE,
        lr=method.default_lr, weight_decay=C.WEIGHT_DECAY, warmup_ratio=C.WARMUP_RATIO, lr_schedule=C.LR_SCHEDULE,
        max_grad_norm=C.MAX_GRAD_NORM, precision=C.PRECISION, seed=C.SEED, eval_every=C.EVAL_EVERY,
        save_every=C.SAVE_EVERY, save_every_minutes=C.SAVE_EVERY_MINUTES, eval_batch_size=C.EVAL_BATCH_SIZE, num_beams=C.NUM_BEAMS,
        max_new_tokens=C.MAX_NEW_TOKENS, min_new_tokens=C.MIN_NEW_TOKENS, max_caption_tokens=C.MAX_CAPTION_TOKENS,
        num_workers=C.NUM_WORKERS, drop_rejected=C.DROP_REJECTED, drop_precanned=C.DROP_PRECANNED,
        val_max_images=C.VAL_MAX_IMAGES, val_meteor=C.VAL_METEOR, lora_r=C.LORA_R, lora_alpha=C.LORA_ALPHA, lora_dropout=C.LORA_DROPOUT,
        lora_targets=C.LORA_TARGETS, strict=C.STRICT, objective="xe", grad_accum=C.GRAD_ACCUM,
        grad_checkpointing=C.GRAD_CHECKPOINTING, compile=C.COMPILE, scst_samples=C.SCST_SAMPLES, scst_temperature=C.SCST_TEMPERATURE,
        scst_baseline=C.SCST_BASELINE, label_smoothing=C.LABEL_SMOOTHING, prompt=C.PROMPT,
        ocr=C.OCR, ocr_min_confidence=C.OCR_MIN_CONFIDENCE, ocr_max_tokens=C.OCR_MAX_TOKENS,
        eval_at_start=C.EVAL_AT_START, length_penalty=C.LENGTH_PENALTY, repetition_penalty=C.REPETITION_PENALTY,
        exact_preprocessing=C.EXACT_PREPROCESSING, tf32=C.TF32, train_modules=C.TRAIN_MODULES,
        image_size=C.IMAGE_SIZE,
    )


def load_saved(output_dir):
    """The configuration a run in `output_dir` was started with, or None."""
    path = Path(output_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        with open(path) as f:
            saved = json.load(f)
        return {k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(RunConfig)}}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise UserError(f"{path}: run configuration is not valid JSON ({error})")


def check_method(saved, method, output_dir):
    """A run directory belongs to one method: refuse to train, resume or test another method's run in it."""
    if saved.get("method") != method.name:
        raise UserError(f"{Path(output_dir) / CONFIG_FILE}: this directory holds a '{saved.get('method')}' run, "
                        f"not '{method.name}' (use src.{saved.get('method')}.* or another --output-dir)")


# A resumed run (resume, or train on a directory that holds a run) takes a flag given with another value than the
# saved run's only if it is listed here, and records it in config.json: these change how the same training is
# computed, watched or found. Every other setting defines the run's trajectory or what its best validation CIDEr-D
# means (learning rate, schedule, warm-up, weight decay, clipping, steps or epochs, batch size, seed, objective and
# its settings, label smoothing, prompt, starting checkpoint, LoRA, which captions are kept and how long, image
# preprocessing, validation decoding and subset): the optimizer and scheduler state would override some of them
# anyway, and changing others mid-run makes a run that neither value describes. Those keep the saved value, and the
# run logs which given flags it ignored (resume_notes). A field added to RunConfig keeps its saved value unless
# listed here.
CHANGEABLE_ON_RESUME = {
    "output_dir", "data_dir",  # where the run and the data are (a job may stage the data on its node's disk)
    "eval_every", "save_every", "save_every_minutes", "eval_at_start",  # when to validate and save
    "eval_batch_size", "num_workers", "grad_accum", "grad_checkpointing", "compile",  # memory, speed: same gradient
    "precision", "tf32",  # the arithmetic the GPU offers (a requeued job may land on another kind)
    "strict", "val_meteor",  # whether a bad image stops the run; one more metric reported
}


def _absolute(key, value):
    """Local paths made absolute, so that config.json and a LoRA adapter's base path work from any directory."""
    if key in ("data_dir", "output_dir"):
        return str(Path(value).expanduser().resolve())
    if key == "checkpoint" and Path(value).exists():  # else a hub name
        return str(Path(value).resolve())
    return value


def given_settings(args):
    """The settings the command line gives (flags left out are None), by RunConfig field."""
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    given = {k: _absolute(k, v) for k, v in vars(args).items() if v is not None and k in fields}
    if getattr(args, "keep_rejected", False):
        given["drop_rejected"] = False
    if getattr(args, "keep_precanned", False):
        given["drop_precanned"] = False
    return given


def resolve(method, args, saved=None, resuming=False):
    """Merge defaults < `saved` (the run in --output-dir) < flags the user actually gave; `resuming` that run, only
    the flags in CHANGEABLE_ON_RESUME (resume_notes says which others were given)."""
    values = defaults(method)
    if saved:
        check_method(saved, method, args.output_dir or values["output_dir"])
        values.update(saved)
    given = given_settings(args)
    if resuming:
        _check(RunConfig(**{**values, **given}))  # an ignored flag is still refused if it makes no sense
        given = {k: v for k, v in given.items() if k in CHANGEABLE_ON_RESUME}
    elif given.get("objective") == "scst" and not saved:
        # warm-up and decay are cross-entropy habits; self-critical.pytorch trains SCST at a small constant rate
        # (a fraction of the method's rate: of the family's, in apply_recipe, when no constant sets it)
        values.update(lr=method.default_lr and method.default_lr * C.SCST_LR_FRACTION, lr_schedule="constant",
                      warmup_ratio=0.0)
    values.update(given)
    values = {k: _absolute(k, v) for k, v in values.items()}
    config = RunConfig(**values)
    _check(config)
    return config


# The settings a family's fine-tuning recipe gives when no flag, environment variable or constant does
# (families/base.py, Family.recipe). Precedence: flag > environment variable or constant > family recipe > this
# project's default (Family.recipe in families/base.py, for what a family's authors do not publish).
RECIPE = ("lr", "lr_schedule", "warmup_ratio", "weight_decay", "label_smoothing", "prompt", "num_beams",
          "max_new_tokens", "min_new_tokens", "length_penalty", "train_modules", "image_size")


def apply_recipe(config, method, family, recipe):
    """Fill the RECIPE settings `config` leaves open (None) from `recipe` ({setting: (value, source)}, the family's
    recipe for the checkpoint: families.apply_recipe); the caller saves `config` with them, so a resumed or tested run
    reads the same values. Returns the log lines that say where each setting came from."""
    by_source, kept = {}, []
    for field in RECIPE:
        if getattr(config, field) is not None:
            kept.append(_as_flag(field, getattr(config, field)))
            continue
        value, source = recipe[method.recipe_keys.get(field, field)]
        if field == "lr" and config.objective == "scst":  # SCST: a fraction of the cross-entropy rate
            value *= C.SCST_LR_FRACTION
        setattr(config, field, value)
        by_source.setdefault(source, []).append(_as_flag(field, value))
    _check(config)
    if not by_source:
        return []
    lines = [f"{family.name} defaults from {source}: {', '.join(flags)}"
             for source, flags in by_source.items()]
    if kept:
        lines.append(f"settings from flags, environment variables or src/base/constants.py: {', '.join(kept)}")
    return lines


def resume_notes(config, saved, args):
    """The log lines of a resumed run: the flags given that it ignored, and the settings that changed."""
    ignored = [f"{_as_flag(k, v)} (stays {_as_value(k, getattr(config, k))})"
               for k, v in given_settings(args).items() if v != getattr(config, k)]
    if getattr(args, "find_batch_size", None):
        ignored.append(f"--find-batch-size (new runs only; stays --batch-size {config.batch_size})")
    changed = [f"{_as_flag(k, getattr(config, k))} (was {_as_value(k, saved[k])})" for k in sorted(CHANGEABLE_ON_RESUME)
               if k != "output_dir" and k in saved and getattr(config, k) != saved[k]]
    notes = []
    if ignored:
        notes.append(f"flags IGNORED on resume: {', '.join(ignored)}: a resumed run keeps the settings that define "
                     f"its training; to train with these, start a new run (--fresh, or another --output-dir with "
                     f"--checkpoint {Path(config.output_dir) / 'best_model'})")
    if changed:
        notes.append(f"changed on resume: {', '.join(changed)}; recorded in {Path(config.output_dir) / CONFIG_FILE}")
    return notes


def _as_flag(key, value):
    """The flag that gives RunConfig field `key` the value `value`."""
    if key in ("drop_rejected", "drop_precanned"):  # set only by --keep-rejected, --keep-precanned
        return f"--keep-{key[len('drop_'):]}"
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    return f"{flag} {_as_value(key, value)}"


def _as_value(key, value):
    if key in ("drop_rejected", "drop_precanned"):
        return "dropped" if value else "kept"
    if isinstance(value, bool):
        return "on" if value else "off"
    return repr(value) if isinstance(value, str) and (not value or " " in value) else str(value)


def _check(config):
    """Refuse settings that make no sense; the RECIPE settings still open (None) are checked once filled."""
    positive = ["batch_size", "eval_batch_size", "num_beams", "max_new_tokens", "max_caption_tokens", "lora_r",
                "grad_accum", "scst_samples", "image_size"]
    for name in positive:
        if getattr(config, name) is not None and getattr(config, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(config, name)}")
    if config.max_caption_tokens < 3:
        raise UserError("--max-caption-tokens must be at least 3 (start token, one word, end token)")
    if config.max_steps <= 0 and config.epochs <= 0:
        raise UserError("give --epochs or --max-steps greater than 0")
    if config.label_smoothing is not None and not 0.0 <= config.label_smoothing < 1.0:
        raise UserError(f"--label-smoothing must be in [0, 1), got {config.label_smoothing}")
    if config.repetition_penalty <= 0:
        raise UserError(f"--repetition-penalty must be positive, got {config.repetition_penalty}")
    if not 0.0 <= config.ocr_min_confidence <= 1.0:
        raise UserError(f"--ocr-min-confidence must be in [0, 1], got {config.ocr_min_confidence}")
    if config.ocr_max_tokens < 1:
        raise UserError(f"--ocr-max-tokens must be positive, got {config.ocr_max_tokens}")
    if config.lr is not None and config.lr <= 0:
        raise UserError(f"--lr must be positive, got {config.lr}")
    if config.save_every_minutes <= 0:
        raise UserError(f"--save-every-minutes must be positive, got {config.save_every_minutes}")
    if not config.scst_temperature > 0:
        raise UserError(f"--scst-temperature must be positive, got {config.scst_temperature}")
    if config.scst_baseline not in ("mean", "greedy"):
        raise UserError(f"--scst-baseline must be mean or greedy, got {config.scst_baseline!r}")
    if config.objective == "scst" and config.scst_baseline == "mean" and config.scst_samples < 2:
        raise UserError("--scst-baseline mean needs --scst-samples 2 or more (the mean of an image's other samples)")
    if config.objective == "scst" and config.compile:
        raise UserError("--compile applies to cross-entropy training only (SCST samples captions each step)")
    if config.mbr < 0 or config.mbr == 1:
        raise UserError(f"--mbr is the number of candidates to choose from: 2 or more (0 = beam search), got {config.mbr}")
    if config.precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {config.precision!r}")


def training_parser(description, checkpoint_help="starting model: hub name or local directory",
                    batch_help="images per optimizer step, all GPUs together; each brings all its kept captions"):
    """Flags of train, resume and test (all default to None: 'not given', so saved values survive a resume)."""
    p = ArgumentParser(description=description)
    p.add_argument("--data-dir", help="VizWiz root: annotations/{train,val,test}.json and train/ val/ test/ images")
    p.add_argument("--output-dir", help="where the run writes best_model/, metrics.jsonl, state/, logs")
    p.add_argument("--checkpoint", help=checkpoint_help)
    p.add_argument("--objective", choices=["xe", "scst"],
                   help="xe: cross-entropy on the reference captions; scst: self-critical training with a CIDEr-D "
                        "reward, from the fine-tuned model given by --checkpoint")
    p.add_argument("--scst-samples", type=int, help="SCST: captions sampled per image (default 5)")
    p.add_argument("--scst-temperature", type=float,
                   help="SCST: the policy samples from softmax(logits / T) and is scored the same way (default 0.5)")
    p.add_argument("--scst-baseline", choices=["mean", "greedy"],
                   help="SCST reward baseline: mean of the image's other samples (default) or its greedy caption")
    p.add_argument("--label-smoothing", type=float,
                   help="cross-entropy label smoothing (default: the family's recipe, 0.1 for BLIP and GIT, 0 for "
                        "BLIP-2; 0 = off)")
    p.add_argument("--prompt", help="text every caption starts from (default: the family's recipe, BLIP 'a picture "
                                    "of', BLIP-2 'a photo of', GIT none; '' = none): trained on but not scored, "
                                    "generated from, stripped from written captions")
    p.add_argument("--ocr", action=argparse.BooleanOptionalAction,
                   help="put each image's OCR words (from <data-dir>/ocr/<split>.json: python scripts/ocr.py) in its "
                        "caption's prefix, before the prompt: read, never trained to be written, never in a caption")
    p.add_argument("--ocr-min-confidence", type=float,
                   help="--ocr: leave out text boxes read with less confidence (0-1, default 0.5)")
    p.add_argument("--ocr-max-tokens", type=int, help="--ocr: at most this many tokens of OCR words per image "
                                                       "(largest text first; default 12)")
    p.add_argument("--image-size", type=int,
                   help="train and caption at this many pixels, square (default: the family's recipe: the checkpoint's "
                        "own size, 364 for BLIP-2's ViT-g as its authors fine-tune it; a checkpoint trained here: "
                        "the size it was trained at); the vision position embeddings are interpolated to it")
    p.add_argument("--epochs", type=int, help="passes over every kept caption of the training set")
    p.add_argument("--max-steps", type=int, help="optimizer steps in all; > 0 overrides --epochs")
    p.add_argument("--batch-size", type=int, help=batch_help)
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-ratio", type=float, help="fraction of steps for linear warm-up")
    p.add_argument("--lr-schedule", help="transformers scheduler name: cosine, linear, constant_with_warmup, ...")
    p.add_argument("--max-grad-norm", type=float, help="gradient clipping norm (0 = off)")
    p.add_argument("--grad-accum", type=int,
                   help="split each step's --batch-size images into this many micro-batches: same effective batch "
                        "and gradient, less memory")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction,
                   help="recompute activations during backward: much less memory, ~30%% more compute")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the training forward (first steps slower while it compiles)")
    p.add_argument("--precision", help="auto | fp32 | bf16 | bf16-weights | fp16 (auto: bf16 on GPUs that have it, "
                                       "else fp32; bf16-weights: bf16 weights, fp32 master copies in the optimizer)")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction,
                   help="TF32 matmuls and convolutions under --precision fp32 too (faster on A100/H100, 10-bit "
                        "mantissa); bf16 and fp16 runs use them anyway")
    p.add_argument("--seed", type=int)
    p.add_argument("--eval-every", type=int, help="steps between validations (0 = only at epoch ends)")
    p.add_argument("--eval-at-start", action=argparse.BooleanOptionalAction,
                   help="validate the starting checkpoint before training (step 0 in metrics.jsonl), so that "
                        "best_model/ is never worse than where the run started (default on)")
    p.add_argument("--save-every", type=int, help="steps between training-state saves (0 = only at validations)")
    p.add_argument("--save-every-minutes", type=float, help="and at least this often in wall time")
    p.add_argument("--time-limit", metavar="HH:MM:SS",
                   help="save the state and exit with status 99 (SGE requeues) while there is still time for the "
                        "next step or validation and a final save before this limit, counted from the job's start "
                        "(the SGE wrappers set it from -l h_rt); not saved with the run")
    p.add_argument("--allow-cpu", action="store_true", default=None,
                   help="run on the CPU although the job asked for a GPU (CUDA_VISIBLE_DEVICES set, or an SGE job with "
                        "-l gpu=...) and torch sees none; without it such a run stops at its start (ALLOW_CPU=1 too)")
    p.add_argument("--strict", action=argparse.BooleanOptionalAction,
                   help="stop at an unreadable image instead of skipping it")
    p.add_argument("--eval-batch-size", type=int, help="images per generate() call")
    p.add_argument("--num-beams", type=int, help="beam size for validation captions")
    p.add_argument("--max-new-tokens", type=int, help="longest generated caption, in tokens")
    p.add_argument("--min-new-tokens", type=int, help="shortest generated caption, in tokens")
    p.add_argument("--length-penalty", type=float, help="beam search: > 1 favours longer captions, < 1 shorter (1 = none)")
    p.add_argument("--repetition-penalty", type=float, help="> 1 discourages repeating tokens (1 = none)")
    p.add_argument("--max-caption-tokens", type=int, help="training captions are cut to this many tokens")
    p.add_argument("--num-workers", type=int, help="DataLoader workers (-1 = from NSLOTS / CPU count)")
    p.add_argument("--exact-preprocessing", action=argparse.BooleanOptionalAction,
                   help="decode JPEGs at full size, so pixels equal BlipImageProcessor's (default: reduced-size "
                        "decoding, faster, close but not equal; the image cache is then not used)")
    p.add_argument("--val-max-images", type=int, help="score only the first N validation images (0 = all)")
    p.add_argument("--val-meteor", action=argparse.BooleanOptionalAction,
                   help="also compute METEOR at each validation (slow: a Java process per validation)")
    p.add_argument("--keep-rejected", action="store_true", help="train and score on rejected captions too")
    p.add_argument("--keep-precanned", action="store_true", help="train and score on precanned captions too")
    p.add_argument("--lora-r", type=int, help="LoRA rank (src.peft)")
    p.add_argument("--lora-alpha", type=int, help="LoRA alpha (src.peft)")
    p.add_argument("--lora-dropout", type=float, help="LoRA dropout (src.peft)")
    p.add_argument("--lora-targets", help="comma-separated module names for LoRA (src.peft), e.g. query,value")
    p.add_argument("--train-modules",
                   help="comma-separated parts of the model that train (src.ft; 'all' = every weight) or train fully "
                        "besides the LoRA adapters (src.peft; 'none'), e.g. qformer,projection,vision for BLIP-2; "
                        "default: the family's recipe (docs/families.md)")
    return p

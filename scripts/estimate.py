"""Plan a training job before submitting it: time per epoch, per validation and for the whole run, peak memory,
a run-time limit for qsub, and on a GPU the largest batch that fits.

    python scripts/estimate.py ft --data-dir data/vizwiz --epochs 5 --json results/plan-ft.json    # on the GPU node
    python scripts/estimate.py ft --from-profile results/plan-ft.json --epochs 10 --eval-every 500  # re-plan, no GPU
    python scripts/estimate.py ft --data-dir data/demo/vizwiz --checkpoint data/demo/tiny-blip \\
        --train-images 23431 --val-images 7750      # profile on a small set, read off VizWiz-size numbers

It takes the usual training flags and measures the real engine with them: the startup (imports, model
load, data indexing, from this process's start), --warmup-steps untimed and --profile-steps timed optimizer
steps (data loading included), validation passes over 1 and --val-batches eval batches (captioning and
scoring) to fit a fixed cost plus a cost per image, one training-state save, one new-best write
(best_model/, example images, curves) and the peak memory (GPU: max allocated; CPU: peak resident size).
It then replays the run step by step on the engine's schedule (validation every --eval-every steps, at
each epoch end and at the last step, each followed by a state save; saves every --save-every steps and
after --save-every-minutes), taking every validation to find a new best (an upper bound). On a GPU it also
finds the largest batch that trains (halving from --search-from on out-of-memory errors) and times it.
--json writes the profile and the prediction; --from-profile re-predicts from such a file for other
epochs, steps, validation and save settings or data sizes, without profiling. --fit HH:MM:SS cuts the run to
one job of that length (see `fit`) and prints its qsub line. The cost per step holds
for the profiled batch size, beams, precision and model only: change those and profile again.

--clock cpu times everything in CPU seconds of this process and its children instead of wall seconds: the
prediction is then the run's CPU time, which other jobs on a shared CPU do not stretch (use OMP_NUM_THREADS=1
for the profile and the run, so that no CPU time goes to threads waiting for each other).

Accuracy: tests/test_estimate.py runs this on the demo assets (tiny BLIP, synthetic set) and then the real
`python -m src.ft.train` with the same flags, both on one thread; the predicted whole run must be within
TOLERANCE (40%) of that process's measured time (start to exit), both in CPU seconds, so that other work on the
test machine cannot fail it. A wall-clock prediction is only as good as the machine is steady: on a CPU that
other jobs share, a run's speed changes from minute to minute (see README.md, "Planning a job").
"""
import time

STARTED = time.time()  # the startup is timed from here, before the heavy imports, as a run's would be

import dataclasses
import importlib
import json
import math
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.base import profiling
from src.base.budget import format_duration, parse_time_limit, save_margin
from src.base.config import RunConfig, defaults, resolve, training_parser
from src.base.data import load_split, with_captions
from src.base.engine import Trainer, peak_memory_gb
from src.base.helpers import UserError, exit_on_user_error, log, setup_logging

TOLERANCE = 0.40      # the demo's predicted whole run is within this fraction of the measured one (tested)
SAFETY_MARGIN = 1.25  # h_rt = predicted whole run x this, rounded up to the minute
VALIDATION_SHARE = 0.25  # --fit: the validations of a job take at most this share of it
SUGGESTED = ("epochs", "max_steps", "eval_every", "val_max_images")  # the settings --fit chooses
# settings that change the cost of a step or of a validation image: a profile holds for its own values only
PROFILE_BOUND = ("checkpoint", "batch_size", "precision", "objective", "grad_accum", "grad_checkpointing", "compile",
                 "scst_samples", "scst_baseline", "max_caption_tokens", "num_workers", "eval_batch_size", "num_beams",
                 "max_new_tokens", "min_new_tokens", "val_meteor", "lora_r", "lora_targets", "train_modules")


@dataclass
class Plan:
    """What a run will do: the numbers its time scales with."""
    batch_size: int
    epochs: int
    max_steps: int
    eval_every: int
    save_every: int
    save_every_minutes: float
    train_images: int
    val_images: int
    eval_at_start: bool = True

    @property
    def steps_per_epoch(self):
        return math.ceil(self.train_images / self.batch_size)

    @property
    def total_steps(self):
        return self.max_steps if self.max_steps > 0 else self.epochs * self.steps_per_epoch


@dataclass
class Timeline:
    seconds: float    # steps, validations and saves, not the startup
    validations: int
    saves: int        # training-state saves (each validation ends with one)


def replay(plan, step_seconds, validation_seconds, state_save_seconds, best_save_seconds):
    """Walk through the run step by step as Trainer._consume schedules validations and saves."""
    clock = last_save = 0.0
    validations = saves = 0
    if plan.eval_at_start:  # the starting model's validation (step 0), then a state save
        clock += validation_seconds + best_save_seconds + state_save_seconds
        last_save, validations, saves = clock, 1, 1
    for step in range(1, plan.total_steps + 1):
        clock += step_seconds
        epoch_ended = step % plan.steps_per_epoch == 0
        if (plan.eval_every > 0 and step % plan.eval_every == 0) or epoch_ended or step == plan.total_steps:
            clock += validation_seconds + best_save_seconds
            validations += 1
        elif not ((plan.save_every > 0 and step % plan.save_every == 0)
                  or clock - last_save > 60 * plan.save_every_minutes):
            continue
        last_save = clock
        clock += state_save_seconds
        saves += 1
    return Timeline(clock, validations, saves)


def h_rt(seconds, margin=SAFETY_MARGIN):
    """An SGE run-time limit: `seconds` x `margin`, rounded up to the minute, as HH:MM:SS."""
    minutes = math.ceil(seconds * margin / 60)
    return f"{minutes // 60:02d}:{minutes % 60:02d}:00"


def predict(profile, plan, margin=SAFETY_MARGIN):
    """Times (seconds), counts and memory of the run `plan` describes, from the measured costs in `profile`."""
    step = profile["step_seconds"]
    validation = profile["validation_fixed_seconds"] + profile["validation_seconds_per_image"] * plan.val_images
    timeline = replay(plan, step, validation, profile["state_save_seconds"], profile["best_save_seconds"])
    first_validation_extra = profile["first_validation_extra_seconds"] if timeline.validations else 0.0
    whole_run = profile["startup_seconds"] + timeline.seconds + first_validation_extra
    prediction = {
        "steps_per_epoch": plan.steps_per_epoch, "total_steps": plan.total_steps, "step_seconds": step,
        "captions_per_second": profile["captions_per_step"] / step, "epoch_seconds": plan.steps_per_epoch * step,
        "validation_seconds": validation, "validations": timeline.validations, "state_saves": timeline.saves,
        "startup_seconds": profile["startup_seconds"], "training_seconds": plan.total_steps * step,
        "validating_seconds": timeline.validations * (validation + profile["best_save_seconds"]) + first_validation_extra,
        "saving_seconds": timeline.saves * profile["state_save_seconds"], "whole_run_seconds": whole_run,
        "peak_memory_gb": profile["peak_memory_gb"], "h_rt": h_rt(whole_run, margin), "safety_margin": margin,
    }
    largest = profile.get("largest_batch")
    if largest:
        prediction["largest_batch"] = {**largest, "epoch_seconds": math.ceil(plan.train_images / largest["batch_size"])
                                       * largest["step_seconds"]}
    return prediction


# ---------------------------------------------------------------- fitting a run to one job

def validation_seconds(profile, val_images):
    """One validation and its new-best write."""
    return (profile["validation_fixed_seconds"] + profile["validation_seconds_per_image"] * val_images
            + profile["best_save_seconds"])


def fits(profile, plan, budget_seconds, margin=SAFETY_MARGIN):
    """Whether the run ends (its prediction x `margin`) before --time-limit `budget_seconds` would stop it: the
    engine stops when the next step or validation would leave less than the final save's margin."""
    whole_run = predict(profile, plan, margin)["whole_run_seconds"]
    return whole_run * margin + save_margin(profile["state_save_seconds"]) <= budget_seconds


def fit(profile, plan, budget_seconds, margin=SAFETY_MARGIN):
    """`plan` cut to one job of `budget_seconds`: the most steps that fit, up to the plan's (in epochs if the plan
    counts epochs and all fit), with validations taking at most VALIDATION_SHARE of the job: further apart
    (--eval-every doubled, then only at epoch ends), then on fewer images. UserError if not even one step fits."""
    share = VALIDATION_SHARE * budget_seconds

    def validating(candidate):
        return predict(profile, candidate, margin)["validations"] * validation_seconds(profile, candidate.val_images)

    def shaped(steps):
        candidate = dataclasses.replace(plan, max_steps=steps)
        while candidate.eval_every > 0 and validating(candidate) > share:
            candidate.eval_every = candidate.eval_every * 2 if candidate.eval_every * 2 < steps else 0
        if validating(candidate) > share and profile["validation_seconds_per_image"] > 0:
            count = predict(profile, candidate, margin)["validations"]
            candidate.val_images = int((share / count - validation_seconds(profile, 0))
                                       / profile["validation_seconds_per_image"])
        return candidate

    def fits_in_budget(steps):
        candidate = shaped(steps)
        return candidate.val_images >= 1 and fits(profile, candidate, budget_seconds, margin)

    if not fits_in_budget(1):
        raise UserError(f"--fit {format_duration(budget_seconds)}: too short for the startup, one step, the "
                        f"validations and the final save's margin")
    low, high = 1, plan.total_steps  # the most steps that fit: fits_in_budget(low) holds throughout
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits_in_budget(middle) else (low, middle - 1)
    best = shaped(low)
    if plan.max_steps <= 0 and low == plan.total_steps:  # all the planned epochs fit: say so in epochs
        best.max_steps = 0
    return best


def command_flags(method, config, args):
    """Flags for the job: the ones given now and the profiled settings the costs depend on (not --fit's own)."""
    default, flags = defaults(method), []
    for key, value in dataclasses.asdict(config).items():
        given = getattr(args, key, None) is not None
        if key in SUGGESTED or key == "method" or not (given or (key in PROFILE_BOUND and value != default[key])):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    flags += ["--keep-rejected"] * (not config.drop_rejected) + ["--keep-precanned"] * (not config.drop_precanned)
    return flags


def suggested_flags(plan):
    length = ["--max-steps", plan.max_steps] if plan.max_steps > 0 else ["--epochs", plan.epochs]
    return [*map(str, length), "--eval-every", str(plan.eval_every), "--val-max-images", str(plan.val_images)]


def qsub_line(method, flags, budget_seconds):
    limit = format_duration(budget_seconds)
    return shlex.join(["qsub", "-l", f"h_rt={limit}", f"{method.name}_train.sh", *flags, "--time-limit", limit])


def print_fit(planned, fitted, prediction, budget_seconds, qsub, margin):
    limit = format_duration(budget_seconds)
    print(f"fit in {limit} (validations at most {VALIDATION_SHARE:.0%} of it; the whole run x {margin} ends before "
          f"the time limit's last-save margin):")
    print(f"  {' '.join(suggested_flags(fitted))}: {prediction['total_steps']} steps, whole run "
          f"{duration(prediction['whole_run_seconds'])}, {prediction['validations']} validations of "
          f"{fitted.val_images} images ({duration(prediction['validating_seconds'])})")
    if fitted.total_steps < planned.total_steps:
        print(f"  (the planned {planned.total_steps} steps need more: this is what one job trains; the planned run "
              f"goes on in requeued jobs with --time-limit)")
    print(f"  {qsub}")


# ---------------------------------------------------------------- measuring

def count_val_images(config):
    """Validation images with a kept caption, before --val-max-images."""
    return len(with_captions(load_split(config.data_dir, "val", config.drop_rejected, config.drop_precanned)))


def device_name(device):
    import torch
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"


def measure(method, config, args):
    """Profile the real Trainer built from `config`: the costs `predict` scales."""
    profiling.clock = profiling.CLOCKS[args.clock]
    trainer = Trainer(method, config)
    # CPU seconds count from the process's start, as a run's do; wall seconds from this module's import
    startup = profiling.cpu_seconds() if args.clock == "cpu" else time.time() - STARTED
    device = trainer.device
    profiling.reset_peak_memory(device)
    log.info(f"timing {args.profile_steps} training steps after {args.warmup_steps} warm-up steps")
    steps = profiling.time_training_steps(trainer, args.profile_steps, args.warmup_steps)
    log.info(f"timing validation passes over 1 and {args.val_batches} eval batches, and the saves")
    validation, last_pass = profiling.time_validation(trainer, args.val_batches)
    saves = profiling.time_saves(trainer, last_pass)
    profile = {"method": method.name, "device": device_name(device), "precision": trainer.precision,
               "clock": args.clock, "config": dataclasses.asdict(config), "train_images": len(trainer.train_records),
               "train_captions": sum(len(r.captions) for r in trainer.train_records),
               "val_images_all": count_val_images(config), "startup_seconds": startup,
               "warmup_steps": args.warmup_steps, "profile_steps": args.profile_steps, **steps, **validation, **saves,
               "peak_memory_gb": peak_memory_gb(device), "largest_batch": None}
    if device.type == "cuda" and args.search_from > 0:
        profile["largest_batch"] = measure_largest_batch(trainer, args)
    return profile


def measure_largest_batch(trainer, args):
    size = profiling.largest_batch_on(trainer, args.search_from)
    log.info(f"largest batch that fits: {size} images per step; timing it")
    profiling.release_gpu_memory()
    profiling.reset_peak_memory(trainer.device)
    loader = profiling.loader_with_batch_size(trainer, size)
    steps = profiling.time_training_steps(trainer, min(args.profile_steps, 10), 2, loader)
    return {"batch_size": size, **steps, "peak_memory_gb": peak_memory_gb(trainer.device)}


# ---------------------------------------------------------------- re-planning from a saved profile

def read_profile(path, method):
    try:
        profile = json.loads(Path(path).read_text())["profile"]
        profile_method = profile["method"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"--from-profile {path}: not a profile written by scripts/estimate.py --json ({error})")
    if profile_method != method.name:
        raise UserError(f"--from-profile {path}: profiled for {profile_method}, not {method.name}")
    return profile


def config_from_profile(method, args, profile):
    """The profiled run's configuration with the flags given now; refuses flags that change the measured costs."""
    known = {field.name for field in dataclasses.fields(RunConfig)}
    config = resolve(method, args, {k: v for k, v in profile["config"].items() if k in known})
    changed = [f"--{key.replace('_', '-')}" for key in PROFILE_BOUND
               if getattr(config, key, None) != profile["config"].get(key)]
    if changed:
        raise UserError(f"--from-profile {args.from_profile}: {', '.join(changed)} differ from the profiled run "
                        f"(they change the cost per step or per image); profile again with them")
    return config


# ---------------------------------------------------------------- output

def duration(seconds):
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def print_report(profile, plan, prediction):
    p, q = profile, prediction
    memory = "peak resident size of the process" if p["device"].startswith("CPU") else "GPU, max allocated"
    print(f"profile: {p['method']} on {p['device']}, {p['precision']}, {plan.batch_size} images per step "
          f"({p['captions_per_step']:.1f} captions on average), {p['profile_steps']} steps timed, "
          f"{p.get('clock', 'wall')} seconds")
    print(f"  training step    {p['step_seconds']:.3f} s ({q['captions_per_second']:.1f} captions/s)")
    print(f"  validation       {p['validation_fixed_seconds']:.2f} s + {1000 * p['validation_seconds_per_image']:.1f} ms "
          f"per image (captioning and scoring)")
    print(f"  saves            state {p['state_save_seconds']:.2f} s; new best (best_model/, examples, curves) "
          f"{p['best_save_seconds']:.2f} s")
    print(f"  startup          {p['startup_seconds']:.1f} s (imports, model load, data indexing)")
    print(f"prediction: {plan.train_images} training images ({q['steps_per_epoch']} steps per epoch), "
          f"{q['total_steps']} steps, {plan.val_images} validation images")
    print(f"  one epoch        {duration(q['epoch_seconds'])}")
    print(f"  one validation   {duration(q['validation_seconds'])}")
    print(f"  validations      {q['validations']}, state saves {q['state_saves']}")
    print(f"  whole run        {duration(q['whole_run_seconds'])} (startup {duration(q['startup_seconds'])}, "
          f"training {duration(q['training_seconds'])}, validation {duration(q['validating_seconds'])}, "
          f"saves {duration(q['saving_seconds'])})")
    print(f"  peak memory      {q['peak_memory_gb']:.2f} GB ({memory})")
    print(f"  suggested limit  -l h_rt={q['h_rt']} (whole run x {q['safety_margin']}, rounded up to the minute)")
    if "largest_batch" in q:
        b = q["largest_batch"]
        print(f"  largest batch    {b['batch_size']} images per step fits (peak {b['peak_memory_gb']:.1f} GB): "
              f"{b['step_seconds']:.3f} s per step, one epoch {duration(b['epoch_seconds'])}")


# ---------------------------------------------------------------- command line

def parse_args(argv):
    parser = training_parser("Predict the time and memory of a training run from a short profile (see the module "
                             "docstring of scripts/estimate.py).")
    parser.add_argument("method", choices=["ft", "peft"], help="full fine-tuning or LoRA")
    parser.add_argument("--profile-steps", type=int, default=30, help="optimizer steps timed")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--val-batches", type=int, default=3, help="eval batches in the larger timed validation pass")
    parser.add_argument("--search-from", type=int, default=256,
                        help="GPU: search the largest batch from this many images per step down (0 = no search)")
    parser.add_argument("--train-images", type=int, help="predict for this many training images (default: as profiled)")
    parser.add_argument("--val-images", type=int,
                        help="predict for a validation split of this many images (default: as profiled); "
                             "--val-max-images still caps it")
    parser.add_argument("--clock", choices=sorted(profiling.CLOCKS), default="wall",
                        help="time in wall seconds, or in CPU seconds of this process and its children: those predict "
                             "the run's CPU time, which other jobs on a shared CPU do not stretch (on a CPU, with "
                             "OMP_NUM_THREADS=1 for the profile and the run)")
    parser.add_argument("--safety-margin", type=float, default=SAFETY_MARGIN, help="h_rt = whole run x this")
    parser.add_argument("--from-profile", help="re-predict from this --json file instead of profiling")
    parser.add_argument("--json", help="write the profile and the prediction here")
    parser.add_argument("--fit", metavar="HH:MM:SS",
                        help="suggest --epochs or --max-steps, --eval-every and --val-max-images for one job of this "
                             "length (its h_rt), and print the qsub line")
    args = parser.parse_args(argv)
    for name in ("profile_steps", "val_batches", "train_images", "val_images", "safety_margin"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.warmup_steps < 0:
        parser.error(f"--warmup-steps must be 0 or more, got {args.warmup_steps}")
    return args


def plan_for(config, profile, args):
    val_images = args.val_images or profile["val_images_all"]
    if config.val_max_images > 0:
        val_images = min(val_images, config.val_max_images)
    return Plan(config.batch_size, config.epochs, config.max_steps, config.eval_every, config.save_every,
                config.save_every_minutes, args.train_images or profile["train_images"], val_images,
                config.eval_at_start)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    budget_seconds = parse_time_limit(args.fit, "--fit")
    setup_logging()
    method = importlib.import_module(f"src.{args.method}.method").METHOD
    if args.from_profile:
        profile = read_profile(args.from_profile, method)
        config = config_from_profile(method, args, profile)
    else:
        config = resolve(method, args)
        profile = measure(method, config, args)
    plan = plan_for(config, profile, args)
    prediction = predict(profile, plan, args.safety_margin)
    print_report(profile, plan, prediction)
    result = {"profile": profile, "plan": dataclasses.asdict(plan), "prediction": prediction}
    if budget_seconds:
        fitted = fit(profile, plan, budget_seconds, args.safety_margin)
        qsub = qsub_line(method, command_flags(method, config, args) + suggested_flags(fitted), budget_seconds)
        fitted_prediction = predict(profile, fitted, args.safety_margin)
        print_fit(plan, fitted, fitted_prediction, budget_seconds, qsub, args.safety_margin)
        result["fit"] = {"budget_seconds": budget_seconds, "plan": dataclasses.asdict(fitted),
                         "prediction": fitted_prediction, "qsub": qsub}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Hyper-parameter sweeps: every configuration of a sweep file, run here one after another or as one SGE array job.

    python scripts/sweep.py list   FILE                 the configurations, numbered 1..N, and their directories
    python scripts/sweep.py run    FILE [--task I]      configuration I (default: $SGE_TASK_ID, as in an array job)
    python scripts/sweep.py local  FILE                 all of them, one after another, then the table
    python scripts/sweep.py submit FILE [--dry-run] [--qsub "-tc 4 -l h_rt=48:00:00"]
                                                        qsub -t 1-N sweep.sh FILE: task i runs configuration i
    ... -- --val-max-images 500                         train flags after -- are added to every run

The sweep file (YAML or JSON; keys are train flags without the dashes, lr or batch_size or batch-size):

    name: lora-lr-rank              default: the file name; runs go to output_root/<NNN-param-value...>/
    method: peft                    ft or peft: runs python -m src.<method>.train
    output_root: results/sweeps/x   default: results/sweeps/<name>
    fixed: {epochs: 5}              flags every run gets
    grid: {lr: [1e-4, 2e-4], lora_r: [8, 16]}                every combination (here 4)
    random: {samples: 8, seed: 0, params: {lr: {log_uniform: [1e-5, 1e-3]}, lora_r: {choice: [4, 8, 16]},
             lora_dropout: {uniform: [0.0, 0.2]}}}           N random draws (with a grid: every draw at every point)
    test: true                      then caption the test split (or: val, or [val, test])

A task that a signal stopped exits 99 and SGE requeues it; the rerun resumes the run from its saved state.
Then `python scripts/summarize.py <output_root>` ranks the runs.
"""
import itertools
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
from argparse import BooleanOptionalAction, RawDescriptionHelpFormatter
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from scripts.summarize import SWEEP_FILE, format_table, ranked_rows  # noqa: E402
from src.base import constants as C  # noqa: E402
from src.base.cli import ArgumentParser  # noqa: E402
from src.base.config import training_parser  # noqa: E402
from src.base.helpers import UserError, exit_on_user_error, write_json_atomic  # noqa: E402

SWEEP_KEYS = {"name", "method", "output_root", "fixed", "grid", "random", "test"}
RANDOM_KEYS = {"samples", "seed", "params"}
DISTRIBUTIONS = {"uniform", "log_uniform", "choice"}
SPLITS = ("test", "val")
FORWARDED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


@dataclass
class Sweep:
    file: Path
    name: str
    method: str
    output_root: Path
    swept: list
    runs: list  # [{"task": i, "name": directory name, "params": swept values, "flags": every flag}], task 1..N
    test_splits: list

    def manifest(self):
        return {"name": self.name, "method": self.method, "file": str(self.file), "swept": self.swept,
                "test": self.test_splits, "runs": self.runs}


# ---------------------------------------------------------------- reading and expanding a sweep file

def train_flags():
    """What a sweep may set: train's flags (src.base.config.training_parser) by key; the sweep owns --output-dir."""
    return {a.dest: a for a in training_parser("")._actions if a.option_strings and a.dest not in ("help", "output_dir")}


def load_sweep(file):
    file = Path(file)
    try:
        text = file.read_text()
        spec = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except OSError as error:
        raise UserError(f"{file}: cannot read the sweep file ({error.strerror or error})")
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise UserError(f"{file}: not valid {'JSON' if file.suffix == '.json' else 'YAML'} ({str(error).splitlines()[0]})")
    if not isinstance(spec, dict):
        raise UserError(f"{file}: a sweep file is a mapping with keys {', '.join(sorted(SWEEP_KEYS))}")
    return expand_sweep(file, spec)


def expand_sweep(file, spec):
    def fail(problem):
        raise UserError(f"{file}: {problem}")

    unknown = set(spec) - SWEEP_KEYS
    if unknown:
        fail(f"unknown key {', '.join(sorted(map(str, unknown)))} (a sweep file has {', '.join(sorted(SWEEP_KEYS))})")
    if spec.get("method") not in ("ft", "peft"):
        fail(f"method must be ft or peft, got {spec.get('method')!r}")
    name = str(spec.get("name") or file.stem)
    if not re.fullmatch(r"[\w.-]+", name):
        fail(f"name {name!r}: use letters, digits, '.', '_' and '-' only")
    flags = train_flags()
    fixed = {key: check_value(fail, flags, key, value) for key, value in section(fail, spec, "fixed").items()}
    grid = expand_grid(fail, flags, section(fail, spec, "grid")) if "grid" in spec else None
    samples = draw_random(fail, flags, section(fail, spec, "random")) if "random" in spec else None
    if grid is None and samples is None:
        fail("nothing to sweep: give grid: and/or random:")
    points = [{**g, **s} for g in (grid or [{}]) for s in (samples or [{}])]
    swept = list(dict.fromkeys(key for point in points for key in point))
    clash = set(swept) & set(fixed)
    if clash:
        fail(f"{', '.join(sorted(clash))} is both fixed and swept")
    width = max(3, len(str(len(points))))
    runs = [{"task": task, "name": run_name(task, width, point), "params": point, "flags": {**fixed, **point}}
            for task, point in enumerate(points, start=1)]
    output_root = Path(spec.get("output_root") or Path(C.RESULTS_DIR) / "sweeps" / name)
    return Sweep(file, name, spec["method"], output_root, swept, runs, test_splits(fail, spec.get("test", False)))


def section(fail, spec, key):
    value = spec.get(key) or {}
    if not isinstance(value, dict):
        fail(f"{key}: must be a mapping of flag: value")
    return {str(k).replace("-", "_"): v for k, v in value.items()}


def check_value(fail, flags, key, value):
    """`value` converted as the train flag converts it, or a one-line error naming the flag."""
    if key not in flags:
        fail(f"unknown flag '{key}' (not a flag of train: see python -m src.ft.train --help; the sweep sets --output-dir)")
    action = flags[key]
    if action.nargs == 0:  # on/off flags: --strict / --no-strict, --keep-rejected
        if not isinstance(value, bool):
            fail(f"{key}: must be true or false, got {value!r}")
        return value
    if isinstance(value, list) and action.type is None and value:  # e.g. lora_targets: [query, value]
        value = ",".join(map(str, value))
    if isinstance(value, (bool, dict, list)) or value is None:
        fail(f"{key}: must be a number or a string, got {value!r}")
    try:
        converted = action.type(str(value)) if action.type else str(value)
    except ValueError:
        fail(f"{key}: {value!r} is not a valid {action.type.__name__}")
    if action.choices and converted not in action.choices:
        fail(f"{key}: {value!r} is not one of {', '.join(action.choices)}")
    return converted


def expand_grid(fail, flags, grid):
    """Every combination of the grid's values, the first key varying slowest."""
    if not grid:
        fail("grid: is empty")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            fail(f"grid: {key} needs a non-empty list of values (a single value goes under fixed:)")
    values = [[check_value(fail, flags, key, v) for v in vs] for key, vs in grid.items()]
    return [dict(zip(grid, combination)) for combination in itertools.product(*values)]


def draw_random(fail, flags, spec):
    """`samples` draws of `params`, reproducible from `seed`; numbers rounded to 3 significant digits."""
    unknown = set(spec) - RANDOM_KEYS
    if unknown:
        fail(f"random: unknown key {', '.join(sorted(map(str, unknown)))} (it has samples, seed, params)")
    samples, seed, params = spec.get("samples"), spec.get("seed", 0), spec.get("params")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        fail(f"random: samples must be a positive integer, got {samples!r}")
    if not isinstance(params, dict) or not params:
        fail("random: params is empty (give e.g. lr: {log_uniform: [1e-5, 1e-3]})")
    rng = random.Random(seed)
    draws = []
    for _ in range(samples):
        draw = {}
        for key, distribution in params.items():
            key = str(key).replace("-", "_")
            value = draw_value(fail, rng, key, distribution)
            if key in flags and flags[key].type is int and isinstance(value, float):
                value = round(value)
            draw[key] = check_value(fail, flags, key, value)
        draws.append(draw)
    return draws


def draw_value(fail, rng, key, distribution):
    if not isinstance(distribution, dict) or len(distribution) != 1 or next(iter(distribution)) not in DISTRIBUTIONS:
        fail(f"random: {key} needs one of {{uniform: [low, high]}}, {{log_uniform: [low, high]}}, {{choice: [values]}}")
    kind, arguments = next(iter(distribution.items()))
    if kind == "choice":
        if not isinstance(arguments, list) or not arguments:
            fail(f"random: {key}: choice needs a non-empty list")
        return rng.choice(arguments)
    try:
        low, high = (float(x) for x in arguments)
    except (TypeError, ValueError):
        fail(f"random: {key}: {kind} needs [low, high], got {arguments!r}")
    if not low < high or (kind == "log_uniform" and low <= 0):
        fail(f"random: {key}: {kind} needs low < high{' and low > 0' if kind == 'log_uniform' else ''}, got {arguments!r}")
    value = math.exp(rng.uniform(math.log(low), math.log(high))) if kind == "log_uniform" else rng.uniform(low, high)
    return float(f"{value:.3g}")


def test_splits(fail, test):
    """test: true -> [test], false -> [], val -> [val], [val, test] as given."""
    if isinstance(test, bool) or test is None:
        return ["test"] if test else []
    splits = [test] if isinstance(test, str) else test
    if not isinstance(splits, list) or not all(split in SPLITS for split in splits):
        fail(f"test: must be true, false, test, val or a list of them, got {test!r}")
    return splits


def run_name(task, width, point):
    """A readable, stable directory name: the task number and the swept values, e.g. 001-lr2e-05-lora_r8."""
    def short(value):
        return f"{value:g}" if isinstance(value, float) else re.sub(r"[^\w.+-]", "+", str(value))
    return f"{task:0{width}d}" + "".join(f"-{key}{short(value)}" for key, value in point.items())


def flag_args(flags):
    """{lr: 2e-05, strict: True, keep_rejected: False} -> ['--lr', '2e-05', '--strict']"""
    actions, args = train_flags(), []
    for key, value in flags.items():
        option = actions[key].option_strings[0]
        if isinstance(actions[key], BooleanOptionalAction):
            args.append(option if value else "--no-" + option[2:])
        elif actions[key].nargs == 0:
            args += [option] if value else []
        else:
            args += [option, str(value)]
    return args


def write_manifest(sweep):
    """<output_root>/sweep.json: the configurations, for the table. A sweep file edited since it was first
    run or submitted would renumber the tasks: refuse rather than mix the two."""
    path = sweep.output_root / SWEEP_FILE
    if path.is_file():
        if json.loads(path.read_text())["runs"] == sweep.runs:
            return
        raise UserError(f"{path}: written for other configurations than {sweep.file} now gives (was the file edited?); "
                        f"set another output_root, or delete {path} to run the new list there")
    sweep.output_root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, sweep.manifest())


# ---------------------------------------------------------------- running

def task_from(task, count):
    from_sge = task is None
    task = os.environ.get("SGE_TASK_ID") if from_sge else task
    if task is None:
        raise UserError("which configuration? pass --task I, or submit as an array job (SGE sets SGE_TASK_ID)")
    if not str(task).isdigit() or not 1 <= int(task) <= count:
        hint = f" (SGE_TASK_ID is 'undefined' outside an array job: submit with qsub -t 1-{count})" if from_sge else ""
        raise UserError(f"task {task!r}: the sweep has configurations 1 to {count}{hint}")
    return int(task)


def run_forwarding_signals(command):
    """Run `command` and return its exit status, passing on SGE's -notify signals (SIGUSR1/2) and SIGTERM: the
    child saves its state and exits 99. Ctrl-C is not passed on: it reaches the child from the terminal, and a
    second one would stop the child without saving."""
    child = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    previous = {s: signal.signal(s, lambda signum, frame: child.send_signal(signum)) for s in FORWARDED_SIGNALS}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        status = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 - status if status < 0 else status  # killed by a signal: the shell's convention


def run_task(sweep, task, extra):
    """Train configuration `task` (and caption with it, if the sweep says so); the exit status of the first failure."""
    run = sweep.runs[task - 1]
    output_dir = sweep.output_root / run["name"]
    print(f"sweep {sweep.name}: task {task} of {len(sweep.runs)}, {output_dir}", flush=True)
    status = run_forwarding_signals([sys.executable, "-m", f"src.{sweep.method}.train", *flag_args(run["flags"]),
                                     "--output-dir", str(output_dir), *extra])
    for split in sweep.test_splits:
        if status:
            break
        status = run_forwarding_signals([sys.executable, "-m", f"src.{sweep.method}.test", "--output-dir",
                                         str(output_dir), "--split", split])
    return status


def run_all(sweep, extra):
    """Every task in order, past failures; a task stopped by a signal stops the sweep (rerun to continue)."""
    failed, stopped = {}, False
    for run in sweep.runs:
        status = run_task(sweep, run["task"], extra)
        if status:
            # imported only when needed: it loads transformers
            from src.base.engine import EXIT_STOPPED
            failed[run["task"]] = status
            stopped = status == EXIT_STOPPED
            if stopped:
                print(f"task {run['task']} was stopped (its state is saved): rerun this command to continue", flush=True)
                break
    print(format_table(ranked_rows([sweep.output_root])))
    for task, status in failed.items():
        print(f"task {task} ({sweep.runs[task - 1]['name']}) exited with status {status}: see its train.log")
    if failed:
        print(f"{len(failed)} of {len(sweep.runs)} runs failed or stopped")
    return failed[max(failed)] if stopped else 1 if failed else 0


def submit(sweep, extra, qsub_args, dry_run):
    script = os.path.relpath(REPO / "sweep.sh")
    command = ["qsub", "-t", f"1-{len(sweep.runs)}", "-N", f"sweep_{sweep.name}", *qsub_args, script, str(sweep.file),
               *(["--", *extra] if extra else [])]
    print(shlex.join(command))
    if dry_run:
        return 0
    if not shutil.which("qsub"):
        raise UserError("qsub: not found on this machine; submit from an SGE login node, "
                        f"or run the sweep here: python scripts/sweep.py local {sweep.file}")
    write_manifest(sweep)
    Path("logs").mkdir(exist_ok=True)  # SGE puts a task in error state if its -o directory is missing
    return subprocess.call(command)


def print_list(sweep):
    rows = [{"task": run["task"], "run": run["name"], **run["params"]} for run in sweep.runs]
    print(format_table(rows, ["task", "run", *sweep.swept]))
    fixed = {k: v for k, v in sweep.runs[0]["flags"].items() if k not in sweep.swept}
    print(f"{len(sweep.runs)} configurations of src.{sweep.method}.train into {sweep.output_root}/"
          + (f"; every run: {shlex.join(flag_args(fixed))}" if fixed else ""))


def parse_args(argv):
    """The sweep tool's arguments, and the train flags after `--` (checked against train's parser)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = ArgumentParser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [("list", "show the configurations"), ("run", "run one configuration"),
                            ("local", "run every configuration here, one after another"),
                            ("submit", "submit the sweep as one SGE array job")]:
        command = commands.add_parser(name, help=help_text)
        command.add_argument("file", help="sweep file (.yaml, .yml or .json)")
        if name == "run":
            command.add_argument("--task", help="configuration number, 1..N (default: $SGE_TASK_ID)")
        if name == "submit":
            command.add_argument("--dry-run", action="store_true", help="print the qsub command, do not run it")
            command.add_argument("--qsub", default="", help="more qsub arguments, e.g. \"-tc 4 -l h_rt=48:00:00\"")
    args = parser.parse_args(argv)
    if training_parser("").parse_args(extra).output_dir:
        parser.error("--output-dir after --: the sweep gives each run its own (set output_root in the sweep file)")
    return args, extra


@exit_on_user_error
def main(argv=None):
    args, extra = parse_args(argv)
    sweep = load_sweep(args.file)
    if args.command == "list":
        print_list(sweep)
        return 0
    if args.command == "submit":
        return submit(sweep, extra, shlex.split(args.qsub), args.dry_run)
    write_manifest(sweep)
    if args.command == "run":
        return run_task(sweep, task_from(args.task, len(sweep.runs)), extra)
    return run_all(sweep, extra)


if __name__ == "__main__":
    sys.exit(main())

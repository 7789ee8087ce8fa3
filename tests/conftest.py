"""Shared fixtures: tiny BLIP, GIT and BLIP-2 checkpoints and small VizWiz-format data sets, made offline, once per
session."""
import gc
import importlib
import io
import json
import os
import re
import signal
import subprocess as _subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]
# real files the tests read, all inside the repository (tests/fixtures/README.md: sources, licences)
FIXTURES = REPO / "tests" / "fixtures"
SAMPLE = FIXTURES / "vizwiz_sample"  # 15 real VizWiz val photos (CC-BY 4.0, Gurari et al. 2020)
HUB_FILES = FIXTURES / "hub_files"  # the Salesforce BLIP checkpoints' config, tokenizer, image processor
HUB_BASE = HUB_FILES / "blip-image-captioning-base"
HUB_LARGE = HUB_FILES / "blip-image-captioning-large"
sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------- nothing read from beside the clone

def _within(path, folder):
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


_PARENT = os.path.realpath(REPO.parent)
# what may lie in the clone's folder besides it: the environment (a venv next to the clone) and temporary files
# (a clone directly in /tmp); an environment or /tmp that holds the whole folder would hide everything in it
_MAY_LIE_BESIDE = [folder for folder in map(os.path.realpath, {sys.prefix, sys.base_prefix, tempfile.gettempdir()})
                   if _within(folder, _PARENT)]
READS_BESIDE = []  # what a test opened or listed beside the clone, until its end (reads_nothing_beside_the_clone)


def beside_the_clone(path):
    """Whether `path` lies in the folder that holds the repository but not in the repository, like a sibling folder: a
    fresh clone elsewhere would not find it. Hidden folders there (~/.cache, ~/.local for a clone in the home
    folder), the environment and temporary files do not count; nor does anything when the clone's folder is /."""
    path = os.path.realpath(path)
    return (_PARENT != os.sep and path != _PARENT and _within(path, _PARENT) and not _within(path, str(REPO))
            and not any(_within(path, folder) for folder in _MAY_LIE_BESIDE)
            and not os.path.relpath(path, _PARENT).startswith("."))


def _record_reads_beside_the_clone(event, args):
    if event in ("open", "os.listdir", "os.scandir") and isinstance(args[0], (str, bytes, os.PathLike)):
        try:
            path = os.fsdecode(args[0])
            if beside_the_clone(path):
                READS_BESIDE.append(path)
        except ValueError:  # a path with a NUL byte: the call itself reports it
            pass


sys.addaudithook(_record_reads_beside_the_clone)  # every file this process opens or lists, from here on


@pytest.fixture(autouse=True)
def reads_nothing_beside_the_clone():
    """Fails a test that read a file beside the clone (from its collection, fixtures or body; its subprocesses are
    not watched): every file a test reads is in the repository or made by the test."""
    yield
    found = list(dict.fromkeys(READS_BESIDE))
    READS_BESIDE.clear()
    if found:
        pytest.fail(f"read outside the repository (a fresh clone has none of it): {', '.join(found[:5])}")

from scripts.make_demo_assets import make_dataset, make_tiny_blip, make_tiny_blip2, make_tiny_git  # noqa: E402

# Settings for quick CPU runs of the real entry points on the tiny model.
FAST = ["--batch-size", "8", "--num-workers", "0", "--num-beams", "1", "--min-new-tokens", "0",
        "--max-new-tokens", "20", "--eval-batch-size", "32"]


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory):
    return make_tiny_blip(tmp_path_factory.mktemp("assets") / "tiny-blip")


@pytest.fixture(scope="session")
def tiny_git(tmp_path_factory):
    return make_tiny_git(tmp_path_factory.mktemp("assets") / "tiny-git")


@pytest.fixture(scope="session")
def tiny_blip2(tmp_path_factory):
    return make_tiny_blip2(tmp_path_factory.mktemp("assets") / "tiny-blip2")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("assets") / "vizwiz", train=240, val=40, test=25, seed=1)


# cross-entropy training of a tiny BLIP on a set from scripts/synthetic_sets.py (other_set_ce_run)
# (no prompt and 5% warm-up pinned: the settings the SCST and precision figures on these sets were measured with)
OTHER_SET_CE = [*FAST, "--eval-batch-size", "64", "--lr", "1e-3", "--eval-every", "50", "--max-steps", "300",
                "--prompt", "", "--warmup-ratio", "0.05"]


@pytest.fixture(scope="session")
def other_set(tmp_path_factory):
    """kind -> (data dir, tiny BLIP) for a synthetic set made by another generator than the demo's
    (scripts/synthetic_sets.py "objects" or "layout"), with its own tiny BLIP; each made once per session."""
    from scripts.synthetic_sets import make_set, texts
    made = {}

    def get(kind):
        if kind not in made:
            root = tmp_path_factory.mktemp(kind)
            made[kind] = (make_set(kind, root / "data", train=240, val=200, test=2, seed=7),
                          make_tiny_blip(root / "tiny", texts=texts(kind), seed=3))
        return made[kind]
    return get


@pytest.fixture(scope="session")
def other_set_ce_run(tmp_path_factory, other_set):
    """kind -> (data dir, tiny BLIP, cross-entropy run dir): other_set(kind) and a cross-entropy run on it."""
    made = {}

    def get(kind):
        if kind not in made:
            data, model = other_set(kind)
            out = tmp_path_factory.mktemp(kind + "-ce") / "ce"
            run_module("src.ft.train", "--data-dir", data, "--checkpoint", model, "--output-dir", out, *OTHER_SET_CE)
            made[kind] = data, model, out
        return made[kind]
    return get


@pytest.fixture(scope="session")
def ft_run(tmp_path_factory, tiny_blip, demo_data):
    """Full fine-tuning of the tiny BLIP on the demo set, 300 steps (validation CIDEr-D about 2.0-2.6)."""
    out = tmp_path_factory.mktemp("runs") / "ft"
    run_module("src.ft.train", "--data-dir", demo_data, "--checkpoint", tiny_blip, "--output-dir", out, *FAST,
               "--lr", "1e-3", "--eval-every", "50", "--max-steps", "300")
    return out


# A 60-step run that saves often, for the tests that stop and resume runs (the step-0 validation has its own tests
# in test_pipeline; here it would only move the step counts)
RUN = [*FAST, "--lr", "1e-3", "--max-steps", "60", "--eval-every", "20", "--save-every", "5", "--no-eval-at-start"]
TIMINGS = {"elapsed_seconds", "train_captions_per_second", "val_seconds", "peak_memory_gb", "device_hours"}


def resume_argv(data, checkpoint_dir, out, *extra):
    return ["--data-dir", str(data), "--checkpoint", str(checkpoint_dir), "--output-dir", str(out), *RUN, *extra]


@pytest.fixture(scope="session")
def straight(tmp_path_factory, tiny_blip, demo_data):
    """Uninterrupted RUN runs of the tiny BLIP on the demo set, one per method: what a stopped and resumed run must
    reproduce exactly."""
    runs = {}
    for method in ("ft", "peft"):
        runs[method] = tmp_path_factory.mktemp("straight") / method
        run_module(f"src.{method}.train", *resume_argv(demo_data, tiny_blip, runs[method]))
    return runs


def same_weights(a, b):
    """Whether two runs' saved states hold the same trained weights, bit for bit."""
    from safetensors.torch import load_file
    import torch
    wa, wb = (load_file(Path(run) / "state" / "trainable.safetensors") for run in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def comparable_metrics(run_dir):
    """metrics.jsonl without its timings: equal for two runs that trained the same."""
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in read_metrics(run_dir)]


def run_module(module, *args, check=True, env=None, subprocess=False):
    """`python -m module args...` from the repo root, offline; returns a CompletedProcess (args, returncode, stdout,
    stderr).

    By default the module's `main(argv)` runs in this process (a new interpreter would spend seconds importing
    torch and transformers again), with what a fresh process would see: cwd, sys.argv, environment (plus `env`),
    stdout and stderr captured at the file-descriptor level (child processes' output too), warnings printed to
    stderr; SystemExit becomes the return code, an uncaught exception a traceback on stderr and return code 1.
    The global state it may change (logging handlers, signal handlers, random-number generators, torch's
    threads and grad mode, warnings filters, environment, cwd) is restored afterwards.

    subprocess=True runs a real `python -m` instead: for what only a new interpreter shows (`env` read at import
    time, such as OMP_NUM_THREADS or the settings in src/base/constants.py; the real command line).
    """
    argv = [str(a) for a in args]
    if subprocess:
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        result = _subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, env=full_env,
                                 capture_output=True, text=True)
    else:
        read_at_import = sorted(set(env or {}) & IMPORT_TIME_ENV)
        if read_at_import:
            raise ValueError(f"run_module({module!r}): {', '.join(read_at_import)} are read at import time; "
                             f"pass subprocess=True")
        result = _run_in_process(module, argv, {"HF_HUB_OFFLINE": "1", **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{module} exited {result.returncode}\nstdout:\n{result.stdout[-3000:]}\n"
                             f"stderr:\n{result.stderr[-3000:]}")
    return result


# environment variables that only take effect when a new interpreter imports torch or src.base.constants
IMPORT_TIME_ENV = ({"OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "PYTHONHASHSEED"}
                   | set(re.findall(r'_env\("(\w+)"', (REPO / "src" / "base" / "constants.py").read_text())))
_WARNINGS_AT_START = (list(warnings.filters), warnings.showwarning, warnings._showwarnmsg_impl)  # before pytest's
_STOP_SIGNALS = [signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT]


def _run_in_process(module, argv, env):
    import logging
    import random

    import numpy as np
    import torch

    main = importlib.import_module(module).main
    vizwiz_log = logging.getLogger("vizwiz")
    saved = dict(environ=dict(os.environ), cwd=os.getcwd(), argv=sys.argv[:], path=sys.path[:],
                 streams=(sys.stdout, sys.stderr),
                 log=(vizwiz_log.handlers[:], vizwiz_log.level, vizwiz_log.propagate),
                 signals={s: signal.getsignal(s) for s in _STOP_SIGNALS},
                 rng=(random.getstate(), np.random.get_state(), torch.get_rng_state()),
                 torch=(torch.get_num_threads(), torch.is_grad_enabled(), torch.get_default_dtype(),
                        torch.are_deterministic_algorithms_enabled(), torch.get_float32_matmul_precision()))
    captured = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
    for stream in saved["streams"]:
        stream.flush()
    saved_fds = [os.dup(1), os.dup(2)]
    code = None
    try:
        os.environ.update(env)
        os.chdir(REPO)
        sys.argv = [str(REPO / (module.replace(".", "/") + ".py")), *argv]
        for fd, file in zip((1, 2), captured):
            os.dup2(file.fileno(), fd)
        # as PYTHONUNBUFFERED=1 made them: every write reaches the file at once, in order with child processes'
        sys.stdout, sys.stderr = (io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding="utf-8",
                                                   errors="backslashreplace", write_through=True) for fd in (1, 2))
        # as a new interpreter has it: no handlers (warnings go to logging.lastResort, on sys.stderr, not to
        # pytest's handlers on the root logger) until setup_logging() adds some on the streams above
        vizwiz_log.handlers.clear()
        vizwiz_log.setLevel(logging.NOTSET)
        vizwiz_log.propagate = False
        with warnings.catch_warnings():
            warnings.filters[:] = _WARNINGS_AT_START[0]  # a new interpreter's filters, printing to stderr
            warnings.showwarning, warnings._showwarnmsg_impl = _WARNINGS_AT_START[1:]
            try:
                code = main(argv)
            except SystemExit as stop:
                code = stop.code
            except Exception:
                traceback.print_exc()
                code = 1
            if code is not None and not isinstance(code, int):
                print(code, file=sys.stderr)
                code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = saved["streams"]
        for fd, saved_fd in zip((1, 2), saved_fds):
            os.dup2(saved_fd, fd)
            os.close(saved_fd)
        for handler in vizwiz_log.handlers:
            if handler not in saved["log"][0]:
                handler.close()  # the run's log file
        vizwiz_log.handlers[:], level, vizwiz_log.propagate = saved["log"]
        vizwiz_log.setLevel(level)
        for s, handler in saved["signals"].items():
            signal.signal(s, handler)
        random.setstate(saved["rng"][0])
        np.random.set_state(saved["rng"][1])
        torch.set_rng_state(saved["rng"][2])
        threads, grad, dtype, deterministic, matmul = saved["torch"]
        torch.set_num_threads(threads)
        torch.set_grad_enabled(grad)
        torch.set_default_dtype(dtype)
        torch.use_deterministic_algorithms(deterministic)
        torch.set_float32_matmul_precision(matmul)
        os.chdir(saved["cwd"])
        sys.argv[:], sys.path[:] = saved["argv"], saved["path"]
        os.environ.clear()
        os.environ.update(saved["environ"])
        gc.collect()
    stdout, stderr = (_universal_newlines(file) for file in captured)
    return _subprocess.CompletedProcess([sys.executable, "-m", module, *argv], (code or 0) & 0xFF, stdout, stderr)


def _universal_newlines(file):
    """What subprocess.run(text=True) would have returned: decoded, with \\r\\n and \\r as \\n."""
    file.seek(0)
    text = file.read().decode("utf-8", errors="replace")
    file.close()
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_metrics(output_dir):
    with open(Path(output_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def write_annotations(path, images, annotations=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {"images": images}
    if annotations is not None:
        content["annotations"] = annotations
    path.write_text(json.dumps(content))
    return path


def random_images(family, count):
    """Random pixel values at the family's input size."""
    size = family.config.vision_config.image_size
    import torch
    return torch.randn(count, 3, size, size)


def sharp_family_model(checkpoint):
    """(family, model in eval mode) of `checkpoint` with its weight matrices redrawn larger (std 0.3): at the usual
    0.02 initialisation every token attends almost uniformly, and a wrong attention mask or a misplaced token would
    change the loss by only about 1e-6."""
    import torch
    from src.base.families import load_family
    family = load_family(checkpoint)
    model = family.load_model(checkpoint).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() > 1:
                weight.normal_(0, 0.3)
    return family, model


def assert_checkpointing_keeps_the_gradient(family, model, batch):
    """The trainable parameters' gradient of family.loss on `batch` is the same with activation checkpointing
    (--grad-checkpointing) as without; the same seed before each pass, so dropout draws the same masks."""
    import torch
    from src.base.modeling import enable_activation_checkpointing
    model.train()
    gradients = []
    for checkpointing in (False, True):
        if checkpointing:
            enable_activation_checkpointing(model)
        model.zero_grad()
        torch.manual_seed(0)
        family.loss(model, batch).backward()
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert gradients[0].abs().sum() > 0 and torch.allclose(gradients[0], gradients[1], atol=1e-7)


def family_caption_batch(family, captions_per_image, vocab):
    """A training batch as the engine builds it: random images, captions of words from `vocab` of different lengths
    (so, padding), `captions_per_image[i]` captions for image i."""
    from src.base.data import CaptionCollator
    samples, n = [], 0
    for image, count in enumerate(captions_per_image):
        captions = [" ".join(vocab[(n + k) % len(vocab)] for k in range(2 + (n + k) % 5)) for k in range(count)]
        n += count
        samples.append({"pixel_values": random_images(family, 1)[0], "image_id": image,
                        "captions": family.training_sequences(captions, 40)})
    return CaptionCollator(family.pad_id, len(family.prefix))(samples)


def assert_sequence_log_probs_are_the_models(family, model, whole_model_logits):
    """family.sequence_log_probs of sampled captions (one cut short by an early end token, padding after it) equal
    the log-probabilities the model's own forward gives them. `whole_model_logits(pixels, tokens)` runs that forward
    on one image and one token row and returns the logits at the token positions."""
    import torch
    pixels = random_images(family, 2)
    features = family.encode_images(model, pixels)
    torch.manual_seed(1)
    sequences = family.sample(model, features, 3, 6)
    start = len(family.prefix)
    sequences[0, start + 1] = family.end_id  # one caption ends early: what follows it must not count
    sequences[0, start + 2:] = family.pad_id
    log_probs, counts = family.sequence_log_probs(model, features.repeat_interleave(3, dim=0), sequences)

    for row, sequence in enumerate(sequences.tolist()):
        chosen = sequence[start:]
        chosen = chosen[: chosen.index(family.end_id) + 1] if family.end_id in chosen else chosen
        tokens = torch.tensor([family.prefix + chosen])
        logits = whole_model_logits(pixels[row // 3: row // 3 + 1], tokens)
        expected = torch.log_softmax(logits, -1)[start - 1: -1].gather(1, tokens[0, start:, None]).sum()
        assert counts[row] == len(chosen)
        assert log_probs[row].item() == pytest.approx(expected.item(), abs=1e-4)


def assert_test_writes_one_caption_per_image(method, run_dir, data_dir):
    """`src.<method>.test` on a run: test_captions.json has one non-empty caption per test image, in order."""
    from src.base.data import load_split
    run_module(f"src.{method}.test", "--output-dir", run_dir)
    captions = json.loads((Path(run_dir) / "test_captions.json").read_text())
    assert [c["image_id"] for c in captions] == [r.image_id for r in load_split(data_dir, "test")]
    assert all(c["caption"].strip() for c in captions)


def run_config(checkpoint, method_name="ft"):
    """The configuration a run of `checkpoint` with no flags gets (its family's recipe filled in)."""
    from importlib import import_module
    from src.base.config import resolve, training_parser
    from src.base.families import apply_recipe
    method = import_module(f"src.{method_name}.method").METHOD
    config = resolve(method, training_parser("x").parse_args(["--checkpoint", str(checkpoint)]))
    apply_recipe(config, method, str(checkpoint))
    return config


def short_scst_run(checkpoint, data_dir, out):
    """Two SCST steps with LoRA (src.peft's method) from `checkpoint`, in this process; returns metrics.jsonl."""
    from src.base.config import resolve, training_parser
    from src.base.engine import Trainer
    from src.base.helpers import setup_logging
    from src.peft.method import METHOD as PEFT
    argv = ["--data-dir", data_dir, "--checkpoint", checkpoint, "--output-dir", out, *FAST,
            "--objective", "scst", "--scst-samples", "3", "--max-steps", "2", "--eval-every", "2",
            "--no-eval-at-start", "--batch-size", "4", "--lr", "1e-4"]
    setup_logging(None)
    assert Trainer(PEFT, resolve(PEFT, training_parser("test").parse_args(list(map(str, argv))))).run() == 0
    return read_metrics(out)

"""best_model/ loads where others load it: transformers 4.40 and peft 0.11 (a grader's course environment, a
classmate's), with the same logits and processor outputs as here; back here identically; readable by the group.

The old libraries are installed once into a folder of their own (cached in ~/.cache/vizwiz-compat-env) and
run by this interpreter with this environment's torch, numpy, safetensors and accelerate (tests/old_env_load.py).
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, SAMPLE, run_config
from src.base.checkpoint import Progress, _drop_new_default_lora_keys, save_best_model, save_training_state
from src.base.config import resolve, training_parser
from src.base.data import ImageTransform, load_image
from src.base.families import load_captioner, load_family
from src.base.lora import add_lora, load_lora
from src.base.modeling import train_only
from src.ft.method import METHOD as FT

# --no-deps: the rest of what they need (torch, numpy, safetensors, accelerate, ...) is this environment's
OLD_PACKAGES = ["transformers==4.40.2", "peft==0.11.1", "tokenizers==0.19.1", "huggingface_hub==0.23.5"]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vizwiz-compat-env"
NETWORK_ERROR = re.compile(r"NewConnectionError|Max retries exceeded|Temporary failure in name resolution|"
                           r"Network is unreachable|No route to host|ProxyError|SSLError|timed out", re.IGNORECASE)
HUB_NAME = "Salesforce/blip-image-captioning-large"
PHOTO = SAMPLE / "val" / "VizWiz_val_00000000.jpg"  # a 1296x968 phone photo
CAPTION = "a can of soup on a kitchen counter"


@pytest.fixture(scope="module")
def old_env():
    """A folder holding OLD_PACKAGES, for PYTHONPATH; installed on first use, then reused."""
    key = hashlib.sha256(" ".join(OLD_PACKAGES).encode()).hexdigest()[:12]
    target = CACHE / f"py{sys.version_info.major}.{sys.version_info.minor}-{key}"
    if target.is_dir():
        return target
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-input",
                             "--disable-pip-version-check", "--retries", "1", "--timeout", "30",
                             "--target", str(partial), *OLD_PACKAGES], capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        output = result.stdout + result.stderr
        if NETWORK_ERROR.search(output):
            pytest.skip(f"no package registry reachable to install {' '.join(OLD_PACKAGES)}: "
                        f"{output.strip().splitlines()[-1]}")
        raise AssertionError(f"pip could not install {OLD_PACKAGES}:\n{output[-3000:]}")
    try:
        partial.rename(target)
    except OSError:  # another session installed it meanwhile
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _hub_cache(root, repo_id, files):
    """A Hugging Face cache holding the directory `files` as `repo_id`'s latest snapshot, as a download leaves it."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(files, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root


def _trained_lora(model):
    """LoRA over `model`, with adapter weights that change its logits (fresh LoRA starts as a no-op)."""
    lora = add_lora(model, r=4, alpha=8, dropout=0.1, targets=["query", "value"])
    torch.manual_seed(0)
    for name, parameter in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=1.0)
    return lora.eval()


@torch.no_grad()
def _logits(model, inputs):
    return model(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"]).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_blip):
    """best_model/ directories written by save_best_model, and the logits their models give here.

    full: the whole model. lora_local: an adapter over a local base (that full model, saved 4.x-readable
    like a hub checkpoint); lora_hub: the same base, loaded by hub name from a Hugging Face cache.
    """
    root = tmp_path_factory.mktemp("compat")
    family = load_family(tiny_blip)
    processor = family.processor
    load_image(PHOTO).save(root / "photo.png")
    inputs = {"pixel_values": ImageTransform(processor.image_processor, use_draft=False)(load_image(PHOTO))[None],
              "input_ids": processor.tokenizer(CAPTION, return_tensors="pt").input_ids}
    save_file(inputs, root / "inputs.safetensors")

    models = {"full": load_captioner(tiny_blip).eval()}
    save_best_model(root / "full", models["full"], family, run_config(tiny_blip))
    base = root / "full" / "best_model"
    models["lora_local"] = _trained_lora(load_captioner(str(base)))
    save_best_model(root / "lora_local", models["lora_local"], family, run_config(base))
    hub = _hub_cache(root / "hub", HUB_NAME, base)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
        models["lora_hub"] = _trained_lora(load_captioner(HUB_NAME))
        save_best_model(root / "lora_hub", models["lora_hub"], family, run_config(base))
    return {"root": root, "hub": hub, "base": base, "inputs": inputs,
            "dirs": {name: root / name / "best_model" for name in models},
            "logits": {name: _logits(model, inputs) for name, model in models.items()}}


def _family_inputs(family):
    """pixel_values of the photo and the token ids of a caption as `family` trains on it."""
    pixel_values = ImageTransform(family.processor.image_processor, use_draft=False)(load_image(PHOTO))[None]
    return {"pixel_values": pixel_values,
            "input_ids": torch.tensor(family.training_sequences([CAPTION], 40))}


@torch.no_grad()
def _text_logits(family, model, inputs):
    """The logits at the caption's positions, as this project computes them for training."""
    features = family.encode_images(model, inputs["pixel_values"])
    return family.token_logits(model, features, inputs["input_ids"], torch.ones_like(inputs["input_ids"]))


@pytest.fixture(scope="module")
def saved_families(tmp_path_factory, tiny_git, tiny_blip2):
    """best_model/ of GIT (the whole model, as src.ft saves it) and of BLIP-2 (its recipe's trained modules, the
    Q-Former and projection changed from the base's), their inputs and the logits they give here."""
    root = tmp_path_factory.mktemp("compat-families")
    dirs, logits, inputs_files = {}, {}, {}
    for name, checkpoint, modules in (("git", tiny_git, None), ("blip2", tiny_blip2, "qformer,projection")):
        family, model = load_family(str(checkpoint)), load_captioner(str(checkpoint)).eval()
        if modules:
            train_only(model, family.module_prefixes(modules))
            torch.manual_seed(0)
            with torch.no_grad():
                for parameter in model.parameters():
                    if parameter.requires_grad:
                        parameter.add_(torch.randn_like(parameter) * 0.1)
        save_best_model(root / name, model, family, run_config(checkpoint))
        dirs[name] = root / name / "best_model"
        inputs = _family_inputs(family)
        inputs_files[name] = root / f"{name}-inputs.safetensors"
        save_file(inputs, inputs_files[name])
        logits[name] = _text_logits(family, model, inputs)
        logits[f"{name}.base"] = _text_logits(family, load_captioner(str(checkpoint)).eval(), inputs)
    return {"dirs": dirs, "logits": logits, "inputs": inputs_files}


@pytest.fixture(scope="module")
def old_results(old_env, saved, saved_families):
    """What transformers 4.40 / peft 0.11 load from each best_model/ and compute: (outputs, report)."""
    out = saved["root"] / "old-env"
    out.mkdir()
    jobs = {"inputs": str(saved["root"] / "inputs.safetensors"), "image": str(saved["root"] / "photo.png"),
            "models": {name: str(path) for name, path in saved["dirs"].items()},
            "families": {name: [str(path), str(saved_families["inputs"][name])]
                         for name, path in saved_families["dirs"].items()},
            "processor": str(saved["dirs"]["full"]), "text": CAPTION}
    (out / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONPATH": str(old_env), "PYTHONNOUSERSITE": "1", "HF_HUB_CACHE": str(saved["hub"]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(REPO / "tests" / "old_env_load.py"), str(out / "jobs.json"), str(out)],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(out / "outputs.safetensors"), json.loads((out / "report.json").read_text())


def test_the_old_libraries_run_with_this_torch(old_env, old_results):
    modules = old_results[1]["modules"]
    for package in OLD_PACKAGES:
        name, version = package.split("==")
        assert modules[name]["version"] == version
        assert Path(modules[name]["file"]).is_relative_to(old_env)
    assert modules["torch"]["version"] == torch.__version__
    assert not Path(modules["torch"]["file"]).is_relative_to(old_env)


def test_full_model_loads_in_transformers_4_with_the_same_logits(saved, old_results):
    outputs, report = old_results
    assert report["models"]["full"]["missing_keys"] == []  # 4.x would start those at random
    difference = (outputs["full.logits"] - saved["logits"]["full"]).abs().max()
    assert difference < 1e-4, float(difference)


@pytest.mark.parametrize("name", ["lora_local", "lora_hub"])
def test_lora_adapter_loads_in_old_peft_over_its_base_with_the_same_logits(saved, old_results, name):
    outputs, report = old_results
    assert report["models"][name]["base"] == (str(saved["base"]) if name == "lora_local" else HUB_NAME)
    assert report["models"][name]["missing_keys"] == []
    assert (saved["logits"][name] - saved["logits"]["full"]).abs().max() > 0.05  # the adapter matters
    difference = (outputs[f"{name}.logits"] - saved["logits"][name]).abs().max()
    assert difference < 1e-4, float(difference)


@pytest.mark.parametrize("name", ["git", "blip2"])
def test_git_and_blip2_best_models_load_in_transformers_4_with_the_same_logits(saved_families, old_results, name):
    """GIT's whole model, and BLIP-2's trained modules over their base (loaded as docs/families.md says)."""
    outputs, report = old_results
    assert report["models"][name]["missing_keys"] == []
    assert report["models"][name].get("unexpected_keys", []) == []
    if name == "blip2":  # only the trained modules were saved, and they matter
        assert not (saved_families["dirs"][name] / "model.safetensors").exists()
        assert (saved_families["logits"][name] - saved_families["logits"]["blip2.base"]).abs().max() > 0.01
    difference = (outputs[f"{name}.logits"] - saved_families["logits"][name]).abs().max()
    assert difference < 1e-4, float(difference)


def test_git_and_blip2_best_models_load_here_with_identical_logits(saved_families):
    for name in ("git", "blip2"):
        family = load_family(str(saved_families["dirs"][name]))
        model = FT.load_best(str(saved_families["dirs"][name])).eval()
        inputs = load_file(saved_families["inputs"][name])
        assert torch.equal(_text_logits(family, model, inputs), saved_families["logits"][name])


def test_processor_loads_in_transformers_4_with_the_same_outputs(saved, old_results):
    outputs, _ = old_results
    processor = load_family(saved["dirs"]["full"]).processor
    image = load_image(saved["root"] / "photo.png")
    here = processor(images=image, text=CAPTION, return_tensors="pt")
    assert torch.equal(outputs["input_ids"], here["input_ids"])
    assert (outputs["pixel_values"] - here["pixel_values"]).abs().max() < 1e-5
    exact = ImageTransform(processor.image_processor, use_draft=False)(image)
    assert (outputs["pixel_values"][0] - exact).abs().max() < 1e-5  # --exact-preprocessing equals 4.x's processor


def test_best_model_loads_here_with_identical_logits(saved, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(saved["hub"]))
    assert torch.equal(_logits(FT.load_best(saved["dirs"]["full"]).eval(), saved["inputs"]), saved["logits"]["full"])
    for name in ("lora_local", "lora_hub"):
        assert torch.equal(_logits(load_lora(saved["dirs"][name]).eval(), saved["inputs"]), saved["logits"][name])


def test_adapter_config_keeps_every_setting_in_use(tmp_path):
    config_file = tmp_path / "adapter_config.json"
    config_file.write_text(json.dumps({"r": 8, "target_modules": ["query"], "peft_version": "0.21.2",
                                       "exclude_modules": None, "use_qalora": False, "lora_bias": True}))
    _drop_new_default_lora_keys(config_file)
    assert json.loads(config_file.read_text()) == {"r": 8, "target_modules": ["query"], "lora_bias": True}


def test_saved_files_follow_the_umask(tmp_path, tiny_blip):
    """safetensors writes 0600; the group of a shared cluster must be able to read best_model/ and state/."""
    model, family = load_captioner(tiny_blip), load_family(tiny_blip)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    argv = ["--checkpoint", str(tiny_blip), "--output-dir", str(tmp_path)]
    config = resolve(FT, training_parser("x").parse_args(argv))
    previous = os.umask(0o027)
    try:
        save_best_model(tmp_path, model, family, config)
        save_best_model(tmp_path / "lora", _trained_lora(load_captioner(tiny_blip)), family, config)
        save_training_state(tmp_path, model, optimizer, scheduler, None, Progress(), config)
    finally:
        os.umask(previous)
    saved = [path for directory in ("best_model", "lora/best_model", "state")
             for path in (tmp_path / directory).rglob("*")]
    assert any(path.suffix == ".safetensors" for path in saved)
    assert {oct(path.stat().st_mode & 0o777) for path in saved if path.is_file()} == {oct(0o640)}

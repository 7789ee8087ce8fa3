"""Runs inside the old environment of test_compat.py (transformers 4.40, peft 0.11 on PYTHONPATH), not under pytest.

Loads what our code saved the way a user of those versions does, and writes what they compute for the test
to compare: `python old_env_load.py JOBS.json OUT_DIR`. JOBS: {"inputs": safetensors with pixel_values and
input_ids, "models": {name: best_model dir}, "processor": a best_model dir, "image": file, "text": caption, and
optionally "families": {name: [best_model dir, safetensors with that model's pixel_values and input_ids]}}.
OUT_DIR gets outputs.safetensors (<name>.logits, pixel_values, input_ids) and report.json. A family model's logits are
those of its text positions (GIT and BLIP-2 put image tokens first).
"""
import json
import sys
from pathlib import Path

import huggingface_hub
import peft
import tokenizers
import torch
import transformers
from PIL import Image
from peft import PeftConfig, PeftModel
from safetensors.torch import load_file, save_file
from transformers import (AutoConfig, Blip2ForConditionalGeneration, BlipForConditionalGeneration, BlipProcessor,
                          GitForCausalLM)
from safetensors.torch import load_file as load_weights

MODEL_CLASSES = {"blip": BlipForConditionalGeneration, "git": GitForCausalLM, "blip-2": Blip2ForConditionalGeneration}


def load(directory):
    """A full model, a LoRA adapter over the base its adapter_config.json names, or trained modules over the base
    their trained_modules.json names (as docs/families.md tells a user to load them); and the weights not in the
    files."""
    adapter, trained = Path(directory) / "adapter_config.json", Path(directory) / "trained_modules.json"
    if adapter.is_file():
        base = PeftConfig.from_pretrained(directory).base_model_name_or_path
    elif trained.is_file():
        base = json.loads(trained.read_text())["base_model_name_or_path"]
    else:
        base = directory
    model_class = MODEL_CLASSES[AutoConfig.from_pretrained(base).model_type]
    model, info = model_class.from_pretrained(base, output_loading_info=True)
    report = {"base": str(base), "missing_keys": info["missing_keys"]}
    if adapter.is_file():
        model = PeftModel.from_pretrained(model, directory)
    if trained.is_file():
        result = model.load_state_dict(load_weights(Path(directory) / "trained_modules.safetensors"), strict=False)
        report["unexpected_keys"] = result.unexpected_keys
    return model.eval(), report


def main(jobs_file, out_dir):
    jobs = json.loads(Path(jobs_file).read_text())
    inputs = load_file(jobs["inputs"])
    outputs, report = {}, {"modules": {}, "models": {}}
    for module in (transformers, peft, tokenizers, huggingface_hub, torch):
        report["modules"][module.__name__] = {"version": module.__version__, "file": module.__file__}
    for name, directory in jobs["models"].items():
        model, report["models"][name] = load(directory)
        with torch.no_grad():
            outputs[f"{name}.logits"] = model(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"]).logits
    for name, (directory, inputs_file) in jobs.get("families", {}).items():
        model, report["models"][name] = load(directory)
        family_inputs = load_weights(inputs_file)
        with torch.no_grad():
            logits = model(pixel_values=family_inputs["pixel_values"], input_ids=family_inputs["input_ids"]).logits
        outputs[f"{name}.logits"] = logits[:, -family_inputs["input_ids"].shape[1]:]
    processor = BlipProcessor.from_pretrained(jobs["processor"])
    processed = processor(images=Image.open(jobs["image"]), text=jobs["text"], return_tensors="pt")
    outputs["pixel_values"], outputs["input_ids"] = processed["pixel_values"], processed["input_ids"]
    save_file({key: value.contiguous() for key, value in outputs.items()}, Path(out_dir) / "outputs.safetensors")
    (Path(out_dir) / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:])

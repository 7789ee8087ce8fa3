"""Runs inside the old environment of test_compat.py (transformers 4.40, peft 0.11 on PYTHONPATH), not under pytest.

Loads what our code saved the way a user of those versions does, and writes what they compute for the test
to compare: `python old_env_load.py JOBS.json OUT_DIR`. JOBS: {"inputs": safetensors with pixel_values and
input_ids, "models": {name: best_model dir}, "processor": a best_model dir, "image": file, "text": caption}.
OUT_DIR gets outputs.safetensors (<name>.logits, pixel_values, input_ids) and report.json.
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
from transformers import BlipForConditionalGeneration, BlipProcessor


def load(directory):
    """A full model, or a LoRA adapter over the base its adapter_config.json names; and the weights not in the files."""
    adapter = Path(directory) / "adapter_config.json"
    base = PeftConfig.from_pretrained(directory).base_model_name_or_path if adapter.is_file() else directory
    model, info = BlipForConditionalGeneration.from_pretrained(base, output_loading_info=True)
    if adapter.is_file():
        model = PeftModel.from_pretrained(model, directory)
    return model.eval(), {"base": str(base), "missing_keys": info["missing_keys"]}


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
    processor = BlipProcessor.from_pretrained(jobs["processor"])
    processed = processor(images=Image.open(jobs["image"]), text=jobs["text"], return_tensors="pt")
    outputs["pixel_values"], outputs["input_ids"] = processed["pixel_values"], processed["input_ids"]
    save_file({key: value.contiguous() for key, value in outputs.items()}, Path(out_dir) / "outputs.safetensors")
    (Path(out_dir) / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:])

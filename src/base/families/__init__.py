"""Captioner families behind one interface (base.Family). The family of a checkpoint is read from its
configuration's `model_type`, never from its name, so hub names, local copies, fine-tuned runs and LoRA
adapters (through the base checkpoint they name) all resolve the same way."""
import json
from pathlib import Path

from ..helpers import UserError
from ..modeling import TRAINED_CONFIG, is_trained_modules, load_pretrained, load_trained_modules
from .base import Family
from .blip import Blip
from .blip2 import Blip2
from .git import Git

FAMILIES = [Blip, Git, Blip2]


def base_checkpoint(checkpoint):
    """The checkpoint a LoRA adapter directory, or a directory of trained modules, was trained over (from its
    adapter_config.json or TRAINED_CONFIG), else `checkpoint`."""
    for name, what in (("adapter_config.json", "LoRA adapter"), (TRAINED_CONFIG, "model's trained modules")):
        pointer = Path(checkpoint) / name
        if pointer.is_file():
            try:
                return json.loads(pointer.read_text())["base_model_name_or_path"]
            except (ValueError, KeyError, TypeError) as error:
                raise UserError(f"{pointer}: cannot read the base checkpoint of this {what} ({error})")
    return checkpoint


def model_config(checkpoint):
    """The model configuration of `checkpoint` (of the base checkpoint, for a LoRA adapter)."""
    from transformers import AutoConfig
    return load_pretrained(AutoConfig, base_checkpoint(checkpoint), "model configuration")


def family_class(config):
    for family in FAMILIES:
        if config.model_type in family.model_types:
            return family
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise UserError(f"model type '{config.model_type}' is not a captioner this project trains (known: {known})")


PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def load_family(checkpoint, prompt=""):
    """The family of `checkpoint`, with its processor and `prompt`. A LoRA adapter directory's processor is its
    own copy (src.peft saves one there), or else the base checkpoint's."""
    config = model_config(checkpoint)
    family = family_class(config)
    has_processor = not Path(checkpoint).is_dir() or any((Path(checkpoint) / f).is_file() for f in PROCESSOR_FILES)
    return family(config, family.load_processor(checkpoint if has_processor else base_checkpoint(checkpoint)), prompt)


def load_captioner(checkpoint):
    """The full captioning model of `checkpoint`, whatever its family (trained modules: over their base)."""
    family = family_class(model_config(checkpoint))
    if is_trained_modules(checkpoint):
        return load_trained_modules(family.load_model(base_checkpoint(checkpoint)), checkpoint)
    return family.load_model(checkpoint)


def apply_recipe(config, method, checkpoint):
    """Fill the settings `config` leaves to the family's recipe from the recipe of `checkpoint`'s family; the log lines
    that say where each setting came from (config.apply_recipe)."""
    from ..config import apply_recipe as fill
    model_configuration = model_config(checkpoint)
    return fill(config, method, family_class(model_configuration), model_configuration)

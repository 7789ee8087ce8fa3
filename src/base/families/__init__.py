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


# best_model/ says how its model was trained to read its input (save_best_model writes it): the prompt its captions
# start from, the image size, OCR words. A run or test from it takes those unless its flags say otherwise.
TRAINED_WITH = "trained_with.json"


def trained_with(checkpoint):
    """The settings `checkpoint` was trained with (TRAINED_WITH), {} for a hub checkpoint or a directory without it."""
    path = Path(checkpoint) / TRAINED_WITH
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text())
        if not isinstance(settings, dict):
            raise ValueError("not a JSON object")
        return settings
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot read how this model was trained ({error}); write it again as JSON, or "
                        f"delete it and give --prompt and --image-size")


def load_captioner(checkpoint):
    """The full captioning model of `checkpoint`, whatever its family (trained modules: over their base), at the image
    size it was trained at."""
    family = family_class(model_config(checkpoint))
    parts_only = is_trained_modules(checkpoint)
    model = family.load_model(base_checkpoint(checkpoint) if parts_only else checkpoint)
    # resized before the trained parts go in: they may include the position embeddings
    family.resize_images(model, trained_with(checkpoint).get("image_size"))
    return load_trained_modules(model, checkpoint) if parts_only else model


# what a checkpoint's TRAINED_WITH gives a run or test that starts from it (before its family's recipe)
INHERITED = ("prompt", "image_size")


def apply_recipe(config, method, checkpoint):
    """Fill the settings `config` leaves open from how `checkpoint` was trained (its TRAINED_WITH) and then from the
    recipe of its family; the log lines that say where each setting came from (config.apply_recipe)."""
    from ..config import apply_recipe as fill
    model_configuration = model_config(checkpoint)
    family = family_class(model_configuration)
    recipe = family.recipe_for(model_configuration)
    trained = trained_with(checkpoint)
    source = f"how {checkpoint} was trained ({TRAINED_WITH})"
    recipe.update({key: (trained[key], source) for key in INHERITED if key in trained})
    if not trained and base_checkpoint(checkpoint) != checkpoint:  # adapter or trained parts saved before TRAINED_WITH
        recipe["image_size"] = (model_configuration.vision_config.image_size, "its base checkpoint's size")
    lines = fill(config, method, family, recipe)
    if bool(trained.get("ocr", False)) != bool(config.ocr) and trained:
        lines.append(f"note: {checkpoint} was trained {'with' if trained.get('ocr') else 'without'} --ocr and this "
                     f"run is {'with' if config.ocr else 'without'} it")
    return lines

"""LoRA adapters (src.peft) over any captioner family: add them to a model, or load a saved adapter."""
import warnings
from pathlib import Path

from .families import base_checkpoint, family_class, load_captioner, trained_with
from .helpers import UserError
from .modeling import check_weight_files


def add_lora(model, r, alpha, dropout, targets):
    """Wrap `model` with LoRA adapters on the modules whose names end with `targets` (BLIP: query, value)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", target_modules=list(targets))
    try:
        with warnings.catch_warnings():  # peft reads an attribute transformers 5 deprecated: noise in every job log
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model, config)
    except ValueError as error:
        raise UserError(f"--lora-targets {','.join(targets)}: {str(error).splitlines()[0]}")


def load_lora(adapter_dir, trainable=False):
    """A LoRA adapter saved by save_pretrained, over the base checkpoint named in its adapter_config.json."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir}: no adapter_config.json here (not a LoRA adapter saved by src.peft)")
    check_weight_files(adapter_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = load_captioner(base_checkpoint(adapter_dir))  # at the image size the adapter was trained at
        family_class(base.config).resize_images(base, trained_with(adapter_dir).get("image_size"))
        return PeftModel.from_pretrained(base, adapter_dir, is_trainable=trainable)

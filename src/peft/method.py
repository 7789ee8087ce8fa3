"""LoRA (BLIP-large by default): only low-rank adapters train (BLIP: on the text decoder's query/value
projections); best_model/ is the adapter (a few MB), loaded over the base checkpoint named in its
adapter_config.json."""
from pathlib import Path

from src.base import constants as C
from src.base.engine import Method
from src.base.helpers import UserError, log
from src.base.families import base_checkpoint
from src.base.lora import add_lora, load_lora
from src.base.modeling import is_trained_modules


def build(config, family):
    if (Path(config.checkpoint) / "adapter_config.json").is_file():  # a trained adapter: go on training it (SCST)
        log.info(f"{config.checkpoint} is a LoRA adapter: training it further (its rank and targets, not --lora-*)")
        return load_lora(config.checkpoint, trainable=True)
    if is_trained_modules(config.checkpoint):  # an adapter names one base checkpoint: the trained parts would be lost
        raise UserError(f"--checkpoint {config.checkpoint}: holds the trained parts of a model (src.ft); train it "
                        f"further with python -m src.ft.train, or LoRA over {base_checkpoint(config.checkpoint)}")
    if config.train_modules.strip() not in ("", "none"):
        raise UserError(f"--train-modules {config.train_modules}: src.peft trains LoRA adapters only; train parts of "
                        f"the model with python -m src.ft.train --train-modules {config.train_modules}")
    targets = [name.strip() for name in config.lora_targets.split(",") if name.strip()] or list(family.lora_targets)
    return add_lora(family.load_model(config.checkpoint), config.lora_r, config.lora_alpha, config.lora_dropout,
                    targets)


METHOD = Method(name="peft", title="LoRA", default_checkpoint=C.PEFT_CHECKPOINT,
                default_lr=C.PEFT_LR, build=build, load_best=load_lora,
                recipe_keys={"lr": "lora_lr", "train_modules": "lora_train_modules"})

"""Full fine-tuning (BLIP-base by default; any family small enough): every weight trains; best_model/ is the
whole model."""
from src.base import constants as C
from src.base.engine import Method
from src.base.families import load_captioner
from src.base.helpers import UserError


def build(config, family):
    if not family.full_fine_tuning:
        raise UserError(f"--checkpoint {config.checkpoint}: full fine-tuning of {family.name} is not supported "
                        f"(too large to train every weight on one GPU); train LoRA adapters with python -m src.peft.train")
    return family.load_model(config.checkpoint)


METHOD = Method(name="ft", title="full fine-tuning", default_checkpoint=C.FT_CHECKPOINT,
                default_lr=C.FT_LR, build=build, load_best=load_captioner)

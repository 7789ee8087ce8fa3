"""Fine-tuning (BLIP-base by default): every weight trains, or the parts of the model its family's recipe or
--train-modules names (BLIP-2: the Q-Former and the projection, OPT frozen); best_model/ is the whole model, or only
the parts that trained, over the checkpoint that holds the rest."""
from src.base import constants as C
from src.base.engine import Method
from src.base.families import load_captioner
from src.base.helpers import UserError
from src.base.modeling import train_only


def build(config, family):
    model = load_captioner(config.checkpoint)
    if config.train_modules.strip() != "all":
        return train_only(model, family.module_prefixes(config.train_modules))
    if not family.full_fine_tuning:
        raise UserError(f"--checkpoint {config.checkpoint}: full fine-tuning of {family.name} is not supported "
                        f"(too large to train every weight on one GPU); train some of its parts "
                        f"(--train-modules {family.recipe['train_modules']}) or LoRA adapters (python -m src.peft.train)")
    return model


METHOD = Method(name="ft", title="fine-tuning", default_checkpoint=C.FT_CHECKPOINT,
                default_lr=C.FT_LR, build=build, load_best=load_captioner)

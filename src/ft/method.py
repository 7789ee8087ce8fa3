"""Full fine-tuning of BLIP-base: every weight trains; best_model/ is the whole model."""
from src.base import constants as C
from src.base.engine import Method
from src.base.modeling import load_captioner


def build(config):
    return load_captioner(config.checkpoint)


METHOD = Method(name="ft", default_checkpoint=C.FT_CHECKPOINT, default_lr=C.FT_LR,
                build=build, load_best=load_captioner)

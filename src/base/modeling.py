"""Model helpers every captioner family shares: loading with one-line errors, unwrapping, activation
checkpointing, parameter counts. What differs between families lives in src/base/families/."""
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from transformers.utils import logging as hf_logging

from .helpers import UserError
from .hub import cache_dir, fetch_command, in_cache, is_hub_name

# transformers warns that image processors fall back to their Pillow backend without torchvision;
# we only read the processor's settings (data.ImageTransform does the pixels), so that is expected.
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()  # "Loading weights" bars: noise in job logs
logging.getLogger("peft").setLevel(logging.ERROR)


def load_pretrained(loader, checkpoint, what, **kwargs):
    """`loader.from_pretrained(checkpoint)`, with a one-line UserError when `checkpoint` cannot be loaded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return loader.from_pretrained(checkpoint, **kwargs)
    except (OSError, ValueError, EnvironmentError) as error:
        reason = first_line(error)
        hub_name = is_hub_name(checkpoint)
        if hub_name and not in_cache(checkpoint):
            raise UserError(f"--checkpoint {checkpoint}: not in the Hugging Face cache ({cache_dir()}) and not "
                            f"downloaded ({reason}); fetch it where there is internet (a login node) with "
                            f"{fetch_command(checkpoint)}")
        where = "Hugging Face hub name (or local directory)" if hub_name else "local directory"
        raise UserError(f"--checkpoint {checkpoint}: cannot load the {what} from this {where}: {reason}")


def first_line(error):
    """The first line of an exception's message (its type when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_weights(model_class, checkpoint, what, **options):
    """`model_class.from_pretrained(checkpoint)` with fp32 weights, whatever the device and whatever dtype the
    checkpoint was saved in (transformers 5 would keep that one): --precision decides afterwards what becomes bf16
    (precision.py)."""
    if Path(checkpoint).is_dir():
        check_weight_files(checkpoint)
    return load_pretrained(model_class, checkpoint, what, dtype=torch.float32, **options)


def check_weight_files(directory):
    """A one-line UserError naming the first *.safetensors file of `directory` that is cut short or damaged, found
    from its header (a copy or a save that stopped part way); transformers and peft would end in a traceback."""
    from safetensors import safe_open

    for path in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt"):
                pass
        except Exception as error:  # safetensors raises its own SafetensorError, or OSError
            raise UserError(f"{path}: truncated or damaged ({first_line(error)}); this model cannot be loaded: "
                            f"copy it back from a backup, train it again, or use another --checkpoint")


# best_model/ of a run that trained only some parts of a model (src.ft --train-modules): those parts' weights, named as
# in the whole model, and a JSON file naming the checkpoint that holds the rest (docs/families.md shows how to load it
# with transformers alone).
TRAINED_CONFIG = "trained_modules.json"
TRAINED_WEIGHTS = "trained_modules.safetensors"


def is_trained_modules(checkpoint):
    """Whether `checkpoint` is a directory holding only the trained parts of a model (TRAINED_CONFIG)."""
    return (Path(checkpoint) / TRAINED_CONFIG).is_file()


def train_only(model, prefixes):
    """Train the parameters whose names (in the transformers model) start with one of `prefixes`; freeze the rest."""
    for name, parameter in core_model(model).named_parameters():
        parameter.requires_grad = name.startswith(tuple(prefixes))
    return model


def load_trained_modules(model, directory):
    """Put the weights of TRAINED_WEIGHTS in `directory` into `model` (built from its base checkpoint)."""
    from safetensors.torch import load_file

    check_weight_files(directory)
    path = Path(directory) / TRAINED_WEIGHTS
    if not path.is_file():
        raise UserError(f"{path}: missing; {Path(directory) / TRAINED_CONFIG} says the trained weights are there")
    weights = load_file(path)
    unknown = sorted(set(weights) - set(core_model(model).state_dict()))
    if unknown:
        raise UserError(f"{path}: {len(unknown)} weights are not in the base model (first: {unknown[0]}); was it "
                        f"trained over another checkpoint?")
    core_model(model).load_state_dict(weights, strict=False)
    return model


def core_model(model):
    """The transformers model inside `model` (unwraps a PEFT model; LoRA layers stay in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def to_device(model, device):
    """`model` on `device`; a quantized model (bitsandbytes, e.g. BLIP2_8BIT) was placed when loaded and refuses .to()."""
    return model if getattr(core_model(model), "is_quantized", False) else model.to(device)


def enable_activation_checkpointing(model):
    """Recompute each layer's activations during backward: far less memory for about a third more compute.

    Non-reentrant checkpointing, so LoRA's adapters get gradients although the layers' inputs need none.
    """
    core_model(model).activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


@contextmanager
def evaluation_mode(model):
    """The whole model in eval mode (no dropout, generation's KV cache on), then every module back in the mode it
    was in (so it nests inside dropout_off)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def dropout_off(model):
    """Every dropout layer off, as in eval mode, while the rest of the model keeps its mode: with activation
    checkpointing (which transformers runs in training mode only) the forward pass is still the eval-mode policy.
    Some models (OPT, in BLIP-2) drop out functionally with probabilities kept as float attributes: those are 0 too."""
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.training]
    rates = [(m, name, getattr(m, name)) for m in model.modules() for name in FUNCTIONAL_DROPOUT
             if type(getattr(m, name, None)) is float and getattr(m, name) > 0]
    for module in dropouts:
        module.eval()
    for module, name, _ in rates:
        setattr(module, name, 0.0)
    try:
        yield model
    finally:
        for module in dropouts:
            module.train()
        for module, name, rate in rates:
            setattr(module, name, rate)


FUNCTIONAL_DROPOUT = ("dropout", "attention_dropout", "activation_dropout", "layerdrop")


def parameter_summary(model):
    """Counts (as peft prints them) and what trains: every weight, LoRA adapters (rank, targets), or which parts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if hasattr(model, "peft_config"):
        lora = next(iter(model.peft_config.values()))
        what = f"LoRA adapters (r={lora.r}, alpha={lora.lora_alpha}) on {', '.join(sorted(lora.target_modules))}"
    elif trainable == total:
        what = "every weight (full fine-tuning)"
    else:
        parts = sorted({name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad})
        what = f"the weights of {', '.join(parts)}"
    return (f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
            f" || training {what}")

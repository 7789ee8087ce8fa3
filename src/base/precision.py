"""Number formats: --precision, TF32, autocast, and bf16 weights with fp32 master copies.

    fp32          every weight and every operation in fp32 (the CPU's default)
    bf16          fp32 weights, operations in bf16 under autocast (GPUs' default: --precision auto)
    bf16-weights  the model's weights in bf16 too, so autocast has no weight to cast at each step, except the modules
                  its transformers class keeps in fp32 (BLIP-2's Q-Former and query tokens); the optimizer updates fp32
                  master copies of the trainable weights (MasterWeights)
    fp16          fp32 weights, fp16 autocast with a loss scaler (GPUs without bf16)

Models load with fp32 weights whatever the precision or device (modeling.load_weights); bf16-weights casts them
after loading (to_bf16_weights), so its master copies start from the checkpoint's fp32 values.
"""
import re
from contextlib import contextmanager, nullcontext

import torch

from .helpers import UserError, log
from .modeling import core_model

PRECISIONS = ("auto", "fp32", "bf16", "bf16-weights", "fp16")
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def resolve_precision(precision, device):
    """auto = bf16 on GPUs that support it (fp16 on older ones), fp32 on the CPU. The CPU runs bf16 and
    bf16-weights when asked (slowly: it is how the tests check them); fp16's loss scaler needs a GPU."""
    if device.type != "cuda":
        if precision == "fp16":
            log.warning("--precision fp16 needs a GPU (its loss scaler is CUDA's): running in fp32")
        return precision if precision in ("bf16", "bf16-weights") else "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def tf32_allowed(precision, tf32):
    """Whether fp32 matmuls and convolutions may use TF32 (a 10-bit mantissa; much faster on A100/H100): under
    bf16/fp16 autocast, which rounds more than that anyway, or when asked (--tf32). --precision fp32 means fp32."""
    return tf32 or precision != "fp32"


def set_tf32(precision, tf32, device):
    """Allow TF32 on a GPU or not, as tf32_allowed decides (the CPU has none)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32_allowed(precision, tf32)


def autocast(precision, device):
    """The autocast context of `precision`. bf16-weights keeps autocast: it runs softmax, normalisation and the
    loss in fp32, while its matmuls find their weights in bf16 already."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


class MasterWeights:
    """--precision bf16-weights: the model holds bf16 weights; the optimizer steps fp32 copies of the trainable ones.

    bf16 keeps 8 bits of mantissa: an update smaller than about 1/256 of a weight would round away if the
    optimizer stepped the bf16 weight itself (most fine-tuning updates are far smaller). So each step the bf16
    gradients move to the fp32 copies (gradients_to_master), the optimizer updates those, and the model gets
    them back rounded to bf16 (master_to_model). Whatever is saved (training state, best_model/) is written
    from the fp32 copies (in_model), so a run resumes exactly and its best model is an fp32 model.
    """

    def __init__(self, model):
        if getattr(core_model(model), "is_quantized", False):
            raise UserError("--precision bf16-weights: not with an 8-bit model (BLIP2_8BIT); use --precision bf16")
        self.trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        # the copies are taken before the cast: the pretrained weights' full fp32 values
        self.master = [p.detach().float().clone().requires_grad_(True) for _, p in self.trainable]
        to_bf16_weights(model)

    def parameters(self):
        """What the optimizer updates: the fp32 copies, in the order of the model's trainable parameters."""
        return list(self.master)

    def gradients_to_master(self):
        """Move the model's (bf16) gradients onto the fp32 copies; the model's are freed."""
        for (_, p), m in zip(self.trainable, self.master):
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def master_to_model(self):
        for (_, p), m in zip(self.trainable, self.master):
            p.copy_(m)

    @contextmanager
    def in_model(self):
        """Inside, the model's trainable parameters hold the fp32 copies themselves: saving writes them, loading
        fills them. On the way out the model gets its bf16 data back, updated from the copies."""
        kept = [p.data for _, p in self.trainable]
        for (_, p), m in zip(self.trainable, self.master):
            p.data = m.data
        try:
            yield
        finally:
            for (_, p), data in zip(self.trainable, kept):
                p.data = data
            self.master_to_model()


def captioning_weights(model, precision):
    """`model` as `precision` captions with: under bf16-weights its weights in bf16, as the run's validations had
    them (the bf16 rounding of the fp32 copies best_model/ holds), so that `test --split val` reproduces the
    validation score, with no weight casts at each decoding step. Other precisions leave it as it is."""
    if precision == "bf16-weights" and not getattr(core_model(model), "is_quantized", False):
        to_bf16_weights(model)
    return model


def fp32_modules(model):
    """The modules (and parameters) that `model`'s transformers class keeps in fp32 when it loads in half precision
    (_keep_in_fp32_modules and _keep_in_fp32_modules_strict; BLIP-2: qformer and query_tokens; BLIP, GIT: none)."""
    core = core_model(model)
    return (set(getattr(core, "_keep_in_fp32_modules", None) or ())
            | set(getattr(core, "_keep_in_fp32_modules_strict", None) or ()))


def to_bf16_weights(model):
    """`model`'s floating-point weights and buffers in bf16, in place (the parameters stay the same objects), except
    those inside its fp32_modules. transformers 5 keeps the non-strict ones fp32 only when loading in fp16; we keep
    them fp32 in bf16 too, as LAVIS (BLIP-2's original code) keeps its Q-Former (0.11B of BLIP-2's 3.9B weights)."""
    kept = [re.compile(rf"(^|\.){re.escape(name)}(\.|$)") for name in fp32_modules(model)]
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not any(pattern.search(name) for pattern in kept):
            tensor.data = tensor.data.to(torch.bfloat16)
    return model


def describe_weights(model, precision):
    """One line for the log: the dtype each part of `model` holds its weights in, and the autocast, e.g.
    "precision bf16-weights: vision_model, language_model in bf16; qformer, query_tokens in fp32 (bf16 autocast)"."""
    parts = {}
    for name, parameter in core_model(model).named_parameters():
        dtype = DTYPE_NAMES.get(parameter.dtype, str(parameter.dtype).removeprefix("torch."))
        parts.setdefault(name.split(".")[0], set()).add(dtype)
    groups = {}
    for part, dtypes in parts.items():
        groups.setdefault("/".join(sorted(dtypes)), []).append(part)
    weights = "; ".join(f"{', '.join(names)} in {dtype}" for dtype, names in groups.items())
    operations = "no autocast" if precision == "fp32" else f"{'fp16' if precision == 'fp16' else 'bf16'} autocast"
    return f"precision {precision}: {weights} ({operations})"


def full_precision(master):
    """master.in_model(), or nothing to do without master weights."""
    return master.in_model() if master is not None else nullcontext()

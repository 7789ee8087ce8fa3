"""--precision bf16-weights: bf16 weights in the model, fp32 master copies in the optimizer (src/base/precision.py).

The CPU runs bf16 autocast too, so what it computes is checked here; how fast it is needs a GPU
(scripts/gpu_check.sh)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST, OTHER_SET_CE, family_caption_batch, read_metrics, run_module
from src.base.engine import LossModule, _optimizer, training_step
from src.base.families import load_captioner, load_family
from src.base.families.blip2 import QFORMER_LORA_TARGETS
from src.base.lora import add_lora
from src.base.objectives import CrossEntropy
from src.base.precision import MasterWeights, captioning_weights, describe_weights, resolve_precision


def test_master_copies_keep_updates_that_bf16_weights_would_round_away():
    """bf16's spacing at 1.0 is 2**-7: an update of 1e-3 rounds away on a bf16 weight, not on its fp32 copy."""
    steps, lr = 20, 1e-3
    plain = torch.nn.Linear(4, 4, bias=False)
    model = torch.nn.Linear(4, 4, bias=False)
    for layer in (plain, model):
        torch.nn.init.ones_(layer.weight)
    plain.to(torch.bfloat16)
    master = MasterWeights(model)
    assert model.weight.dtype == torch.bfloat16 and master.parameters()[0].dtype == torch.float32
    plain_sgd, master_sgd = torch.optim.SGD(plain.parameters(), lr=lr), torch.optim.SGD(master.parameters(), lr=lr)
    for _ in range(steps):
        for layer in (plain, model):
            (-layer.weight.float().sum()).backward()  # a gradient of -1 on every weight: +lr per step
        plain_sgd.step()
        plain_sgd.zero_grad()
        master.gradients_to_master()
        assert model.weight.grad is None  # moved, not copied: the model's bf16 gradient memory is freed
        master_sgd.step()
        master.master_to_model()
        master_sgd.zero_grad()
    assert torch.all(plain.weight == 1)  # every update lost
    expected = torch.full((4, 4), 1 + steps * lr)
    assert torch.allclose(master.parameters()[0], expected, atol=1e-6)
    assert torch.equal(model.weight, expected.to(torch.bfloat16))  # the model: the copy, rounded to bf16


def test_in_model_exposes_the_fp32_copies_for_saving_and_loading():
    model = torch.nn.Linear(3, 2)
    master = MasterWeights(model)
    with torch.no_grad():
        master.parameters()[0].fill_(1 + 1e-4)  # not representable in bf16
    with master.in_model():
        assert model.weight.dtype == torch.float32 and torch.all(model.weight == 1 + 1e-4)
        model.load_state_dict({"weight": torch.full((2, 3), 0.3), "bias": torch.zeros(2)})  # as a resume does
    assert model.weight.dtype == torch.bfloat16 and torch.all(model.weight == torch.tensor(0.3).to(torch.bfloat16))
    assert torch.all(master.parameters()[0] == 0.3)  # the fp32 value itself, not its bf16 rounding


def _steps(tiny_blip, precision, batches):
    """Losses of a few full fine-tuning steps of the tiny BLIP, and its trainable weights afterwards (fp32)."""
    torch.manual_seed(0)
    family, model = load_family(tiny_blip), load_captioner(tiny_blip)
    master = MasterWeights(model) if precision == "bf16-weights" else None
    params = master.parameters() if master else [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params, type("Config", (), {"lr": 1e-3, "weight_decay": 0.05})())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    loss_model, device = LossModule(model), torch.device("cpu")
    losses = [training_step(loss_model, batch, optimizer, scheduler, None, precision, device, 1.0,
                            CrossEntropy(family), master=master)[0] for batch in batches]
    return losses, [p.detach().float() for p in params]


def test_first_steps_follow_fp32_within_bf16_tolerance(tiny_blip):
    family = load_family(tiny_blip)
    words = [w for w in sorted(family.tokenizer.get_vocab()) if w.isalpha() and w.islower()][:20]
    torch.manual_seed(1)
    batches = [family_caption_batch(family, [5, 3, 5, 4], words[i:]) for i in range(6)]
    fp32_losses, fp32_weights = _steps(tiny_blip, "fp32", batches)
    bf16_losses, bf16_weights = _steps(tiny_blip, "bf16-weights", batches)
    start = [p.detach().float() for p in load_captioner(tiny_blip).parameters() if p.requires_grad]
    assert fp32_losses[-1] < fp32_losses[0] - 0.3  # the steps do learn (4.09 -> 3.68)
    for a, b in zip(fp32_losses, bf16_losses):
        assert abs(a - b) < 0.005 * a, (fp32_losses, bf16_losses)  # measured: within 0.0003 * a
    # the weights moved the same way: the change of every tensor points where fp32's does
    moved = [(a - s).flatten() for a, s in zip(fp32_weights, start)]
    moved_bf16 = [(b - s).flatten() for b, s in zip(bf16_weights, start)]
    cosine = torch.nn.functional.cosine_similarity(torch.cat(moved), torch.cat(moved_bf16), dim=0)
    assert cosine > 0.99, cosine  # measured: 0.9996


@pytest.mark.parametrize("kind", ["demo", "objects"])
def test_bf16_weights_learn_what_fp32_learns(kind, ft_run, demo_data, tiny_blip, other_set, tmp_path):
    """The same run as an fp32 cross-entropy run (same seed and data), in bf16-weights, on the demo's set and on a
    set made by another generator; the saved state and best model hold the fp32 copies."""
    if kind == "demo":  # ft_run: conftest's, the demo's fp32 run with these flags (the demo's set learns slowly)
        data, model, fp32_run = demo_data, tiny_blip, ft_run
        flags = [*FAST, "--lr", "1e-3", "--eval-every", "50", "--max-steps", "300"]
    else:  # this set learns in 120 steps what 300 give (measured: fp32 2.05 at 120, 2.06 at 300): both runs here
        (data, model), fp32_run = other_set(kind), tmp_path / "fp32"
        flags = [*OTHER_SET_CE[:OTHER_SET_CE.index("--eval-every")], "--eval-every", "40", "--max-steps", "120",
                 "--prompt", "", "--warmup-ratio", "0.05"]
        run_module("src.ft.train", "--data-dir", data, "--checkpoint", model, "--output-dir", fp32_run, *flags)
    out = tmp_path / "bf16-weights"
    run_module("src.ft.train", "--data-dir", data, "--checkpoint", model, "--output-dir", out, *flags,
               "--precision", "bf16-weights")
    fp32, bf16 = read_metrics(fp32_run), read_metrics(out)
    assert [m["step"] for m in bf16] == [m["step"] for m in fp32]
    untrained, best_fp32, best_bf16 = bf16[0]["CIDEr"], max(m["CIDEr"] for m in fp32), max(m["CIDEr"] for m in bf16)
    # measured: demo 0.19 untrained, fp32 2.40, bf16-weights 2.61; objects (120 steps) 0.21, 2.05, 1.98
    assert best_bf16 > untrained + 1.0 and best_bf16 > best_fp32 - 0.3, (untrained, best_fp32, best_bf16)
    saved = [load_file(out / "state" / "trainable.safetensors"), load_file(out / "best_model" / "model.safetensors")]
    assert all(t.dtype == torch.float32 for weights in saved for t in weights.values())
    # the fp32 best model, captioning in bf16-weights as the run validated: the same captions, the same score
    run_module("src.ft.test", "--output-dir", out, "--split", "val")
    assert json.loads((out / "val_scores.json").read_text())["CIDEr"] == pytest.approx(best_bf16, abs=1e-9)


def test_the_cpu_runs_what_is_asked_except_fp16():
    cpu = torch.device("cpu")
    assert [resolve_precision(p, cpu) for p in ["auto", "fp32", "bf16", "bf16-weights", "fp16"]] == \
        ["fp32", "fp32", "bf16", "bf16-weights", "fp32"]


@pytest.fixture
def seems_a_gpu(monkeypatch):
    """Loading as on a bf16 GPU (only the load asks; the model stays on the CPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)


@pytest.mark.parametrize("family", ["blip", "git", "blip2"])
def test_weights_load_in_fp32_whatever_the_device_and_the_saved_dtype(family, request, seems_a_gpu, tmp_path):
    """--precision decides what becomes bf16, after loading: a checkpoint saved in bf16 (transformers 5 would load it
    as saved) and a GPU (BLIP-2 used to load bf16 on any GPU) still give fp32 weights."""
    load_captioner(request.getfixturevalue(f"tiny_{family}")).to(torch.bfloat16).save_pretrained(tmp_path)
    assert {p.dtype for p in load_captioner(str(tmp_path)).parameters()} == {torch.float32}


def _bf16_parts(model):
    """The top-level parts of a BLIP-2 holding any bf16 weight."""
    return {name.split(".")[0] for name, p in model.named_parameters() if p.dtype == torch.bfloat16}


BLIP2_PARTS = {"vision_model", "query_tokens", "qformer", "language_projection", "language_model"}


def test_bf16_weights_keep_what_transformers_keeps_in_fp32(tiny_blip2):
    """BLIP-2's Q-Former and query tokens (its _keep_in_fp32_modules) stay fp32 under bf16-weights, LoRA adapters in
    the Q-Former included; the master copies of every trainable weight are fp32, and a training step updates them."""
    family = load_family(tiny_blip2)
    model = add_lora(load_captioner(tiny_blip2), 4, 8, 0.0, list(QFORMER_LORA_TARGETS))
    master = MasterWeights(model)
    core = model.get_base_model()
    assert _bf16_parts(core) == BLIP2_PARTS - {"qformer", "query_tokens"}
    assert {p.dtype for p in core.qformer.parameters()} == {torch.float32} and core.query_tokens.dtype == torch.float32
    trainable = {name.split(".")[0]: p.dtype for name, p in core.named_parameters() if p.requires_grad}
    assert trainable == {"qformer": torch.float32, "language_model": torch.bfloat16}
    assert {m.dtype for m in master.parameters()} == {torch.float32}

    before = [m.detach().clone() for m in master.parameters()]
    optimizer = torch.optim.SGD(master.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    batch = family_caption_batch(family, [2, 1], ["a", "cat", "on", "the", "mat"])
    loss, _ = training_step(LossModule(model), batch, optimizer, scheduler, None, "bf16-weights", torch.device("cpu"),
                            1.0, CrossEntropy(family), master=master)
    assert torch.isfinite(torch.tensor(loss))
    moved = {name.split(".")[2] for (name, _), m, b in zip(master.trainable, master.parameters(), before)
             if not torch.equal(m, b)}
    assert moved == {"qformer", "language_model"}  # the fp32 adapters in the Q-Former learn too

    captioner = captioning_weights(load_captioner(tiny_blip2), "bf16-weights")  # as test captions
    assert _bf16_parts(captioner) == BLIP2_PARTS - {"qformer", "query_tokens"}


@pytest.mark.parametrize("precision, line", [
    ("fp32", "query_tokens, vision_model, qformer, language_projection, language_model in fp32 (no autocast)"),
    ("bf16", "query_tokens, vision_model, qformer, language_projection, language_model in fp32 (bf16 autocast)"),
    ("fp16", "query_tokens, vision_model, qformer, language_projection, language_model in fp32 (fp16 autocast)"),
    ("bf16-weights", "query_tokens, qformer in fp32; vision_model, language_projection, language_model in bf16 "
                     "(bf16 autocast)")])
def test_the_log_says_what_each_part_holds_its_weights_in(precision, line, tiny_blip2, seems_a_gpu):
    """On a GPU (BLIP-2 used to load bf16 weights on any GPU, whatever --precision said)."""
    model = load_captioner(tiny_blip2)
    if precision == "bf16-weights":
        MasterWeights(model)
    assert describe_weights(captioning_weights(model, precision), precision) == f"precision {precision}: {line}"

"""Training objectives and step options: the SCST reward is pycocoevalcap's CIDEr-D; gradient accumulation,
micro-batches and gradient checkpointing leave the gradient unchanged."""
import random

import pytest
import torch

from conftest import FAST, SAMPLE
from src.base.cider import CiderD
from src.base.config import resolve, training_parser
from src.base.data import load_split, with_captions
from src.base.engine import Trainer, micro_batches
from src.base.evaluate import score_captions
from src.base.families import load_family
from src.base.helpers import setup_logging
from src.base.objectives import SelfCritical
from src.base.ptb import python_tokenize
from src.ft.method import METHOD as FT
from src.peft.method import METHOD as PEFT


def _trainer(method, data, checkpoint, out, *extra):
    argv = ["--data-dir", data, "--checkpoint", checkpoint, "--output-dir", out, *FAST, "--max-steps", "5", *extra]
    setup_logging(None)
    return Trainer(method, resolve(method, training_parser("test").parse_args(list(map(str, argv)))))


def _first_step_gradients(trainer):
    """The gradients of the first batch's update (captured just before the optimizer uses them) and the loss."""
    captured = {}
    original_step = trainer.optimizer.step

    def capture(*args, **kwargs):
        captured.update({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        return original_step(*args, **kwargs)

    trainer.optimizer.step = capture
    trainer.sampler.set_epoch(0)
    loss, updated = trainer.train_batch(next(iter(trainer.loader)))
    assert updated and captured
    return captured, loss


def _assert_same_gradients(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_scst_reward_is_pycocoevalcap_cider_d(tiny_blip, demo_data):
    """Same captions, same tokenisation, same document frequencies (references = the 'training' set here)."""
    records = with_captions(load_split(SAMPLE, "val")) + with_captions(load_split(demo_data, "val"))
    family = load_family(tiny_blip)
    objective = SelfCritical(family, records, samples=2, baseline="mean", max_new_tokens=20)
    rng = random.Random(0)
    pool = [c for r in records for c in r.captions]
    candidates = {r.image_id: rng.choice(pool + ["", "a a a a a a", r.captions[0]]) for r in records}
    rows = family.training_sequences([candidates[r.image_id] for r in records], 40)
    sequences = torch.tensor([row + [family.pad_id] * (max(map(len, rows)) - len(row)) for row in rows])

    rewards = objective.rewards([r.image_id for r in records], sequences)
    # scored as validation scores a generated caption: the decoded text (the toy vocabulary drops unknown words)
    decoded = dict(zip([r.image_id for r in records], family.decode(sequences)))
    _, per_image, _ = score_captions({r.image_id: r.captions for r in records}, decoded, meteor=False,
                                     tokenizer="python")
    expected = [per_image[r.image_id]["CIDEr"] for r in records]
    assert rewards.tolist() == pytest.approx(expected, abs=1e-9)
    assert max(expected) > 1.0 and min(expected) == 0.0  # the check covers real matches and empty captions


def test_scst_samples_in_eval_mode_and_scores_the_samples_with_dropout_off(tiny_blip, demo_data, tmp_path,
                                                                            monkeypatch):
    """LoRA dropout 0.5 in a training-mode model: the captions are sampled (and the greedy baseline decoded) in
    eval mode, and their log-probabilities come from the same deterministic policy, so the SCST loss of a batch
    does not depend on dropout draws."""
    trainer = _trainer(PEFT, demo_data, tiny_blip, tmp_path, "--objective", "scst", "--scst-samples", "2",
                       "--scst-baseline", "greedy", "--lora-dropout", "0.5", "--lr", "1e-3")
    family, seen = trainer.family, {"sample": [], "log_probs": []}
    original_sample, original_log_probs = type(family).sample, type(family).sequence_log_probs

    def sample(self, model, *args, **kwargs):
        seen["sample"].append(model.training)
        return original_sample(self, model, *args, **kwargs)

    def log_probs(self, model, *args, **kwargs):
        seen["log_probs"].append(any(m.training for m in model.modules() if isinstance(m, torch.nn.Dropout)))
        return original_log_probs(self, model, *args, **kwargs)

    monkeypatch.setattr(type(family), "sample", sample)
    monkeypatch.setattr(type(family), "sequence_log_probs", log_probs)
    trainer.sampler.set_epoch(0)
    batch = next(iter(trainer.loader))
    trainer.model.train()
    losses = []
    for _ in range(2):
        torch.manual_seed(0)
        losses.append(trainer.objective.loss(trainer.model, batch).item())
    assert seen["sample"] == [False, False] * 2  # the samples and the greedy baseline, each call
    assert seen["log_probs"] == [False] * 2
    assert trainer.model.training  # back in training mode afterwards
    assert losses[0] == losses[1]  # same seed, same samples: same loss
    assert any(m.p == 0.5 for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout))  # dropout was there


def test_sequence_log_probs_at_a_temperature_are_those_of_the_softened_policy(tiny_blip, demo_data):
    family = load_family(tiny_blip)
    model = family.load_model(tiny_blip).eval()
    pixels = torch.randn(2, 3, 32, 32)
    features = family.encode_images(model, pixels)
    torch.manual_seed(0)
    sequences = family.sample(model, features, 3, 8, temperature=0.5)
    assert sequences[:, : len(family.prefix)].tolist() == [family.prefix] * 6
    total, counts = family.sequence_log_probs(model, features.repeat_interleave(3, dim=0), sequences, 0.5)
    logits = family.token_logits(model, features.repeat_interleave(3, dim=0), sequences,
                                 torch.ones_like(sequences))[:, :-1]
    per_token = torch.log_softmax(logits / 0.5, -1).gather(2, sequences[:, 1:, None]).squeeze(2)
    mask = family.generated_mask(sequences)
    torch.testing.assert_close(total, (per_token * mask).sum(1), rtol=1e-5, atol=1e-5)
    plain, _ = family.sequence_log_probs(model, features.repeat_interleave(3, dim=0), sequences)
    assert not torch.allclose(plain, total)  # the temperature changes the scores: the check can fail


def test_cider_d_document_frequencies_come_from_the_given_references():
    references = {1: ["a red cup"], 2: ["a red box"], 3: ["a blue box"]}
    cider = CiderD(references)
    assert cider.document_frequency[("red",)] == 2 and cider.document_frequency[("a",)] == 3
    # an n-gram every reference image has carries no weight; a rare one does
    assert cider.score(1, "a") == 0.0
    assert cider.score(1, "red cup") > cider.score(1, "red box") > 0.0
    assert cider.score(1, python_tokenize("A red cup.")) == pytest.approx(cider.score(1, "a red cup"))


def test_micro_batches_keep_each_image_with_its_captions(tiny_blip, demo_data, tmp_path):
    trainer = _trainer(FT, demo_data, tiny_blip, tmp_path, "--batch-size", "5")
    trainer.sampler.set_epoch(0)
    batch = next(iter(trainer.loader))
    parts = micro_batches(batch, 2)
    assert [p["pixel_values"].shape[0] for p in parts] == [3, 2]
    assert sum(p["num_captions"] for p in parts) == batch["num_captions"]
    assert torch.equal(torch.cat([p["pixel_values"] for p in parts]), batch["pixel_values"])
    first = int(parts[0]["captions_per_image"].sum())
    assert torch.equal(parts[1]["labels"], batch["labels"][first:, : parts[1]["labels"].shape[1]])
    assert (batch["labels"][first:, parts[1]["labels"].shape[1]:] == -100).all()  # only padding trimmed
    assert len(micro_batches(batch, 99)) == 5  # never an empty part


@pytest.mark.parametrize("method", [FT, PEFT], ids=["ft", "peft"])
def test_gradient_accumulation_and_checkpointing_give_the_same_gradient(method, tiny_blip, demo_data, tmp_path):
    no_dropout = ["--lora-dropout", "0"]  # dropout masks would differ between one pass and three
    reference, loss = _first_step_gradients(_trainer(method, demo_data, tiny_blip, tmp_path / "a", *no_dropout))
    accumulated, loss_accumulated = _first_step_gradients(
        _trainer(method, demo_data, tiny_blip, tmp_path / "b", *no_dropout, "--grad-accum", "3"))
    _assert_same_gradients(reference, accumulated)
    assert loss_accumulated == pytest.approx(loss, rel=1e-5)
    checkpointed, _ = _first_step_gradients(
        _trainer(method, demo_data, tiny_blip, tmp_path / "c", *no_dropout, "--grad-checkpointing"))
    _assert_same_gradients(reference, checkpointed)


def test_a_compiled_run_of_30_steps_compiles_one_graph_not_one_per_caption_length(tiny_blip, demo_data,
                                                                                    tmp_path, monkeypatch):
    """Caption lengths, caption counts and images per batch (the epoch's last is smaller) change from batch to
    batch: compiled with dynamic shapes, 30 steps capture one graph. (Static shapes recompiled for each new
    length; a repeat_interleave whose output size depended on the counts split it into 3 graphs.)"""
    from torch._dynamo.utils import counters

    from src.base import constants
    monkeypatch.setattr(constants, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    counters.clear()
    trainer = _trainer(FT, demo_data, tiny_blip, tmp_path, "--compile", "--max-steps", "30", "--eval-every", "0",
                       "--save-every", "0", "--no-eval-at-start", "--val-max-images", "2")
    lengths = set()
    original = trainer.train_batch
    trainer.train_batch = lambda batch: (lengths.add(tuple(batch["input_ids"].shape)), original(batch))[1]
    assert trainer.run() == 0
    assert len(lengths) >= 8  # many different batch shapes went through the compiled forward
    assert len({shape[0] for shape in lengths}) >= 2  # caption counts changed too, not only lengths
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_compiled_training_forward_gives_the_same_gradient(tiny_blip, demo_data, tmp_path, monkeypatch):
    from src.base import constants
    monkeypatch.setattr(constants, "COMPILE_BACKEND", "eager")  # dynamo graph capture; inductor would take minutes
    reference, loss = _first_step_gradients(_trainer(FT, demo_data, tiny_blip, tmp_path / "a"))
    trainer = _trainer(FT, demo_data, tiny_blip, tmp_path / "b", "--compile")
    assert trainer.loss_model._compiled_call_impl is not None
    compiled, compiled_loss = _first_step_gradients(trainer)
    _assert_same_gradients(reference, compiled)
    assert compiled_loss == pytest.approx(loss, rel=1e-5)

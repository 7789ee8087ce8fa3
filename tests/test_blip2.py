"""The BLIP-2 family (Salesforce/blip2-opt-*): its tokens agree with transformers' generation, its once-per-image
encoding gives transformers' own loss, SCST's log-probabilities are the model's, src.ft refuses it, and src.peft
trains it (LoRA on the language model only, by default).

Nothing here depends on the tiny BLIP-2's sizes or vocabulary: words come from its tokenizer, sizes and special
tokens from its configuration, so the same tests hold for any BLIP-2 OPT checkpoint.
"""

import json

import pytest
import torch

from conftest import (FAST, assert_checkpointing_keeps_the_gradient, assert_sequence_log_probs_are_the_models,
                      assert_test_writes_one_caption_per_image, family_caption_batch, random_images, read_metrics,
                      run_module, sharp_family_model, short_scst_run)
from src.base.families import load_family
from src.base.families.blip2 import QFORMER_LORA_TARGETS
from src.base.lora import add_lora
from src.base.modeling import dropout_off, parameter_summary


@pytest.fixture(scope="module")
def blip2(tiny_blip2):
    """The tiny BLIP-2, its weights redrawn larger (conftest.sharp_family_model)."""
    return sharp_family_model(tiny_blip2)


def words(family, count=12):
    """Plain words of the byte-level BPE vocabulary (tokens "Ġword": a word after a space), whatever it is."""
    return sorted(t[1:] for t in family.tokenizer.get_vocab() if t[:1] == "Ġ" and t[1:].isalpha() and t[1:].islower())[:count]


def caption_batch(family, captions_per_image):
    return family_caption_batch(family, captions_per_image, words(family))


def with_image_tokens(family, input_ids):
    """input_ids as transformers' Blip2ForConditionalGeneration takes them: num_query_tokens <image> placeholders
    first (the processor's layout)."""
    placeholders = torch.full((input_ids.shape[0], family.config.num_query_tokens), family.config.image_token_index)
    return torch.cat([placeholders, input_ids], dim=1)


def test_training_sequences_start_and_end_as_generation_does(blip2, tiny_blip2):
    family, model = blip2
    text_config = family.config.text_config
    caption = " ".join(words(family, 4))
    sequence = family.training_sequences([caption], 40)[0]
    # OPT's tokenizer starts a text with </s> (text_config.bos_token_id); the end is generation's eos_token_id
    assert sequence == family.tokenizer(caption)["input_ids"] + [text_config.eos_token_id]
    assert sequence[0] == text_config.bos_token_id and family.prefix == [text_config.bos_token_id]
    assert family.decode([sequence + [family.pad_id]]) == [caption]

    # transformers' own generate() (no input_ids: it starts from its <image> placeholders and bos_token_id, stops at
    # the language model's eos) gives our generate()'s captions, and greedy sample() gives them too (both never
    # choose the <image> placeholder, which the redrawn model otherwise would)
    pixels = random_images(family, 2)
    theirs = model.generate(pixel_values=pixels, max_new_tokens=8, num_beams=1, do_sample=False,
                            suppress_tokens=family.never_generated)
    theirs = theirs[:, family.config.num_query_tokens:]
    ours = family.generate(model, pixels, num_beams=1, max_new_tokens=8)
    assert torch.equal(ours, theirs)
    assert torch.equal(family.sample(model, family.encode_images(model, pixels), 1, 8, greedy=True), ours)

    # a model whose first choice is always the end token: generation starts from the prefix, emits it, stops
    hook = model.language_model.get_output_embeddings().register_forward_hook(
        lambda module, inputs, logits: logits.index_add(-1, torch.tensor([family.end_id]),
                                                        torch.full((*logits.shape[:-1], 1), 1e4)))
    try:
        theirs = model.generate(pixel_values=pixels, max_new_tokens=5, num_beams=1, do_sample=False)
        assert torch.equal(theirs[:, family.config.num_query_tokens:], torch.tensor([family.prefix + [family.end_id]] * 2))
        for prompted in (family, load_family(tiny_blip2, prompt=" ".join(words(family, 2)))):
            expected = torch.tensor([prompted.prefix + [prompted.end_id]] * 2)
            assert torch.equal(prompted.generate(model, pixels, num_beams=1, max_new_tokens=5), expected)
            assert torch.equal(prompted.generate(model, pixels, num_beams=2, max_new_tokens=5), expected)
            assert torch.equal(prompted.sample(model, prompted.encode_images(model, pixels), 1, 5), expected)
            assert prompted.decode(expected) == ["", ""]
    finally:
        hook.remove()


def test_loss_equals_transformers_blip2_loss(blip2):
    family, model = blip2
    batch = caption_batch(family, [2, 1, 3])
    ours = family.loss(model, batch)
    # transformers scores the last labels.shape[1] positions, shifted by one. Labels of the text's length only (the
    # positions after the query tokens) fail in transformers 5.24 (.view() of the sliced logits), so the query
    # positions get -100 labels: the same loss.
    pixels = batch["pixel_values"].repeat_interleave(batch["captions_per_image"], dim=0)
    queries = torch.ones(len(pixels), family.config.num_query_tokens, dtype=torch.long)
    theirs = model(pixel_values=pixels, input_ids=with_image_tokens(family, batch["input_ids"]),
                   attention_mask=torch.cat([queries, batch["attention_mask"]], dim=1),
                   labels=torch.cat([queries * -100, batch["labels"]], dim=1)).loss
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
    ours.backward()  # gradients reach the image encoder through the once-encoded features
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vision_model.parameters())
    model.zero_grad()


def test_sequence_log_probs_are_the_models(blip2):
    family, model = blip2
    assert_sequence_log_probs_are_the_models(family, model, lambda pixels, tokens: model(
        pixel_values=pixels, input_ids=with_image_tokens(family, tokens)).logits[0, -tokens.shape[1]:])


@pytest.mark.parametrize("targets, part", [(None, ("language_model.",)),
                                           (QFORMER_LORA_TARGETS, ("language_model.", "qformer."))])
def test_lora_trains_r_times_in_plus_out_per_targeted_linear(tiny_blip2, targets, part):
    family = load_family(tiny_blip2)
    targets = targets or family.lora_targets
    model = family.load_model(tiny_blip2)
    targeted = {name: m for name, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in targets}
    # the defaults hit the language model's attention only; the Q-Former option adds the Q-Former's, never the ViT's
    assert targeted and all(name.startswith(part) for name in targeted)
    assert {name.split(".")[0] for name in targeted} == {p.rstrip(".") for p in part}
    r = 4
    expected = sum(r * (m.in_features + m.out_features) for m in targeted.values())
    model = add_lora(model, r=r, alpha=8, dropout=0.0, targets=targets)
    assert parameter_summary(model).startswith(f"trainable params: {expected:,} ||")

    # the adapters' gradient is the same with activation checkpointing (--grad-checkpointing), dropout and all
    assert_checkpointing_keeps_the_gradient(family, model, caption_batch(family, [2, 3]))


def test_dropout_off_gives_the_eval_mode_policy(tiny_blip2):
    """SCST scores samples with dropout off in a training-mode model; OPT drops out functionally (float rates)."""
    family = load_family(tiny_blip2)
    model = family.load_model(tiny_blip2)
    for name in ("dropout", "attention_dropout"):  # whatever the checkpoint's rates, some dropout to turn off
        setattr(model.config.text_config, name, 0.5)
    model = type(model)(model.config)
    batch = caption_batch(family, [2, 1])
    features = family.encode_images(model.eval(), batch["pixel_values"]).repeat_interleave(
        batch["captions_per_image"], dim=0)
    expected = family.token_logits(model, features, batch["input_ids"], batch["attention_mask"])
    model.train()
    with dropout_off(model):
        logits = family.token_logits(model, features, batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(logits, expected, atol=1e-5)
    assert not torch.allclose(family.token_logits(model, features, batch["input_ids"], batch["attention_mask"]),
                              expected, atol=1e-5)  # the dropout is back


def test_full_fine_tuning_is_refused_in_one_line(tiny_blip2, demo_data, tmp_path):
    # src.ft on BLIP-2 trains the parts its recipe names (tests/test_recipes.py); every weight is refused
    result = run_module("src.ft.train", "--data-dir", demo_data, "--checkpoint", tiny_blip2, "--output-dir", tmp_path,
                        *FAST, "--max-steps", "1", "--train-modules", "all", check=False)
    assert result.returncode == 2
    message = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(message) == 1 and "BLIP-2" in message[0] and "src.peft" in message[0], result.stderr


@pytest.fixture(scope="module")
def blip2_peft_run(tmp_path_factory, tiny_blip2, demo_data):
    out = tmp_path_factory.mktemp("runs") / "blip2-peft"
    # no prompt, as this run was tuned: after BLIP-2's recipe prompt ("a photo of") 60 steps of LoRA on a random tiny
    # OPT barely learn (validation CIDEr-D 0.006 -> 0.03); the run checks that LoRA learns through the engine. At 40 px
    # (the checkpoint's are 32): an adapter loads over its base at the size it was trained at (trained_with.json).
    run_module("src.peft.train", "--data-dir", demo_data, "--checkpoint", tiny_blip2, "--output-dir", out, *FAST,
               "--lr", "2e-2", "--lora-r", "16", "--eval-every", "0", "--max-steps", "60", "--prompt", "",
               "--image-size", "40")
    return out


def test_lora_learns_and_test_writes_one_caption_per_image(blip2_peft_run, demo_data, tmp_path):
    metrics = read_metrics(blip2_peft_run)
    assert metrics[0]["step"] == 0 and metrics[-1]["step"] == 60
    # measured: 0.00 at step 0, about 0.5 at step 60
    assert max(m["CIDEr"] for m in metrics) > metrics[0]["CIDEr"] + 0.2, [m["CIDEr"] for m in metrics]
    assert (blip2_peft_run / "best_model" / "adapter_config.json").is_file()
    assert_test_writes_one_caption_per_image("peft", blip2_peft_run, demo_data)
    # the adapter alone, tested elsewhere: over its base at 40 px, with no prompt, as it was trained and validated
    elsewhere = tmp_path / "elsewhere"
    run_module("src.peft.test", "--output-dir", elsewhere, "--checkpoint", blip2_peft_run / "best_model",
               "--data-dir", demo_data, "--split", "val", *FAST)
    assert json.loads((elsewhere / "val_scores.json").read_text())["CIDEr"] == pytest.approx(
        max(m["CIDEr"] for m in metrics), abs=1e-9)


def test_the_logs_say_what_each_part_holds_its_weights_in(blip2_peft_run, demo_data, tmp_path):
    """One line in train.log and test.log: the dtype of each part's weights and the autocast, as --precision made them
    (bf16-weights keeps the Q-Former and query tokens fp32, as transformers' _keep_in_fp32_modules ask)."""
    everything = "query_tokens, vision_model, qformer, language_projection, language_model"
    assert f"precision fp32: {everything} in fp32 (no autocast)\n" in (blip2_peft_run / "train.log").read_text()
    run_module("src.peft.test", "--output-dir", tmp_path, "--checkpoint", blip2_peft_run / "best_model",
               "--data-dir", demo_data, *FAST, "--precision", "bf16-weights")
    assert ("precision bf16-weights: query_tokens, qformer in fp32; vision_model, language_projection, language_model "
            "in bf16 (bf16 autocast)\n") in (tmp_path / "test.log").read_text()


def test_scst_runs_and_logs_its_reward(blip2_peft_run, demo_data, tmp_path):
    metrics = short_scst_run(blip2_peft_run / "best_model", demo_data, tmp_path)
    assert [m["step"] for m in metrics] == [2]
    assert metrics[0]["train_reward"] > 0  # the LoRA-trained model's samples name some of the right words
    assert (tmp_path / "best_model" / "adapter_config.json").is_file()

"""The GIT family (microsoft/git-*): its tokens agree with generation, its once-per-image encoding gives
transformers' own loss, SCST's log-probabilities are the model's, and the real entry points train it.

Nothing here depends on the tiny GIT's sizes or vocabulary: words come from its tokenizer, image sizes from
its configuration, so the same tests hold for any GIT checkpoint.
"""

import pytest
import torch

from conftest import (FAST, HUB_BASE, assert_checkpointing_keeps_the_gradient,
                      assert_sequence_log_probs_are_the_models, assert_test_writes_one_caption_per_image,
                      family_caption_batch, random_images, read_metrics, run_module, sharp_family_model, short_scst_run)
from src.base.families import load_family
from src.base.lora import add_lora
from src.base.modeling import parameter_summary


@pytest.fixture(scope="module")
def git(tiny_git):
    """The tiny GIT, its weights redrawn larger (conftest.sharp_family_model)."""
    return sharp_family_model(tiny_git)


def words(family, count=12):
    """Plain words of the tokenizer's vocabulary (whatever it is)."""
    return [w for w in sorted(family.tokenizer.get_vocab()) if w.isalpha() and w.islower()][:count]


def caption_batch(family, captions_per_image):
    return family_caption_batch(family, captions_per_image, words(family))


def test_training_sequences_start_and_end_as_generation_does(git, tiny_git):
    family, model = git
    caption = " ".join(words(family, 4))
    sequence = family.training_sequences([caption], 40)[0]
    assert sequence == family.tokenizer(caption)["input_ids"]  # GIT's own text encoding: [CLS] words [SEP]
    assert sequence[: len(family.prefix)] == family.prefix and sequence[-1] == family.end_id
    assert family.decode([sequence]) == [caption]

    # a model whose first choice is always the end token: generation starts from the prefix, emits it, stops
    boosted = family.load_model(tiny_git).eval()
    with torch.no_grad():
        boosted.output.bias[family.end_id] += 1e4
    pixels = random_images(family, 2)
    for prompted in (family, load_family(tiny_git, prompt=" ".join(words(family, 2)))):
        expected = torch.tensor([prompted.prefix + [prompted.end_id]] * 2)
        assert torch.equal(prompted.generate(boosted, pixels, num_beams=1, max_new_tokens=5), expected)
        assert torch.equal(prompted.generate(boosted, pixels, num_beams=2, max_new_tokens=5), expected)
        features = prompted.encode_images(boosted, pixels)
        assert torch.equal(prompted.sample(boosted, features, 1, 5), expected)
        assert prompted.decode(expected) == ["", ""]

    # greedy decoding by sample() (cached, from encoded images) is transformers' generate() token for token
    features = family.encode_images(model, pixels)
    greedy = family.sample(model, features, 1, 8, greedy=True)
    generated = family.generate(model, pixels, num_beams=1, max_new_tokens=8)
    assert torch.equal(greedy, generated)


def test_loss_equals_transformers_git_loss(git):
    family, model = git
    batch = caption_batch(family, [2, 1, 3])
    ours = family.loss(model, batch)
    pixels = batch["pixel_values"].repeat_interleave(batch["captions_per_image"], dim=0)
    theirs = model(pixel_values=pixels, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   labels=batch["labels"]).loss
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
    ours.backward()  # gradients reach the image encoder through the once-encoded features
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.git.image_encoder.parameters())


def test_sequence_log_probs_are_the_models(git):
    family, model = git
    assert_sequence_log_probs_are_the_models(family, model, lambda pixels, tokens: model(
        pixel_values=pixels, input_ids=tokens).logits[0, -tokens.shape[1]:])


def test_lora_trains_r_times_in_plus_out_per_targeted_linear(tiny_git):
    family = load_family(tiny_git)
    model = family.load_model(tiny_git)
    targeted = [m for name, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in family.lora_targets]
    assert targeted and all(".encoder.layer." in n for n, m in model.named_modules() if m in targeted)
    r = 4
    expected = sum(r * (m.in_features + m.out_features) for m in targeted)
    model = add_lora(model, r=r, alpha=8, dropout=0.0, targets=family.lora_targets)
    assert parameter_summary(model).startswith(f"trainable params: {expected:,} ||")

    # the adapters' gradient is the same with activation checkpointing (--grad-checkpointing)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    assert_checkpointing_keeps_the_gradient(family, model, caption_batch(family, [2, 3]))


@pytest.fixture(scope="module")
def git_ft_run(tmp_path_factory, tiny_git, demo_data):
    out = tmp_path_factory.mktemp("runs") / "git-ft"
    run_module("src.ft.train", "--data-dir", demo_data, "--checkpoint", tiny_git, "--output-dir", out, *FAST,
               "--lr", "1e-3", "--eval-every", "0", "--max-steps", "180")
    return out


def test_full_fine_tuning_learns_and_test_writes_one_caption_per_image(git_ft_run, demo_data):
    metrics = read_metrics(git_ft_run)
    assert metrics[0]["step"] == 0 and metrics[-1]["step"] == 180
    # measured: 0.06 at step 0, best about 1.2 within the 180 steps
    assert max(m["CIDEr"] for m in metrics) > metrics[0]["CIDEr"] + 0.6, [m["CIDEr"] for m in metrics]
    assert_test_writes_one_caption_per_image("ft", git_ft_run, demo_data)


def test_scst_with_lora_runs_and_logs_its_reward(git_ft_run, demo_data, tmp_path):
    metrics = short_scst_run(git_ft_run / "best_model", demo_data, tmp_path)
    assert [m["step"] for m in metrics] == [2]
    assert metrics[0]["train_reward"] > 0  # the fine-tuned model's samples name some of the right words
    assert (tmp_path / "best_model" / "adapter_config.json").is_file()


def test_the_real_bert_base_uncased_tokenizer(tmp_path):
    """GIT's tokenizer is bert-base-uncased: [CLS] 101 starts a caption, [SEP] 102 ends it, [PAD] is 0."""
    from scripts.make_demo_assets import make_tiny_git
    from transformers import BertTokenizer, GitProcessor

    tiny = make_tiny_git(tmp_path / "git")
    processor = GitProcessor.from_pretrained(tiny)
    real = BertTokenizer.from_pretrained(HUB_BASE)
    GitProcessor(image_processor=processor.image_processor, tokenizer=real).save_pretrained(tiny)
    family = load_family(tiny)
    assert (family.start_ids(), family.end_id, family.pad_id) == ([101], 102, 0)
    caption = "a can of tomato soup on someone's kitchen counter, next to a close-up of a remote."
    sequence = family.training_sequences([caption], 40)[0]
    assert sequence == family.tokenizer(caption)["input_ids"] and sequence[0] == 101 and sequence[-1] == 102
    assert family.decode([sequence + [0, 0]]) == [caption]


def test_image_transform_gives_the_git_processors_pixels(tiny_git):
    """GIT's processor (CLIP's) resizes the shorter side and crops the centre; ImageTransform must give its pixels."""
    import numpy as np
    from PIL import Image
    from src.base.data import ImageTransform

    processor = load_family(tiny_git).processor.image_processor
    transform = ImageTransform(processor, use_draft=False)
    rng = np.random.default_rng(0)
    for width, height in [(150, 97), (97, 150), (301, 200), (64, 64), (33, 200)]:
        image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
        expected = torch.as_tensor(np.asarray(processor(images=image, return_tensors="np")["pixel_values"][0]))
        assert torch.allclose(transform(image), expected, atol=1e-5), (width, height)

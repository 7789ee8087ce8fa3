"""Batches: dynamic padding, masked labels, and training that starts and ends where generate() does."""
import pytest
import torch

from src.base.data import (CaptionCollator, CaptionTrainingSet, EpochBatchSampler, ImageRecord, ImageTransform,
                           StandIn, load_split, with_captions)
from src.base.families import load_captioner, load_family


@pytest.fixture(scope="module")
def tiny(tiny_blip):
    return load_captioner(tiny_blip), load_family(tiny_blip)


def _batch(tiny, records, max_tokens=40):
    _, family = tiny
    tokens = [family.training_sequences(r.captions, max_tokens) for r in records]
    dataset = CaptionTrainingSet(records, ImageTransform(family.processor.image_processor), tokens)
    return CaptionCollator(family.pad_id, len(family.prefix))([dataset[i] for i in range(len(records))]), tokens


@pytest.fixture(scope="module")
def records(demo_data):
    return with_captions(load_split(demo_data, "train"))[:6]


def test_padding_is_to_the_longest_caption_in_the_batch(tiny, records):
    batch, tokens = _batch(tiny, records)
    longest = max(len(ids) for per_image in tokens for ids in per_image)
    assert batch["input_ids"].shape == (sum(len(r.captions) for r in records), longest)
    assert longest < 30  # never the tokenizer's 512


def test_labels_are_masked_exactly_at_padding_and_the_start_token(tiny, records):
    batch, _ = _batch(tiny, records)
    padding = batch["attention_mask"] == 0
    assert padding.any(), "this batch should have captions of different lengths"
    assert (batch["labels"][padding] == -100).all()
    assert (batch["labels"][:, 0] == -100).all()  # given to the model, never predicted
    scored = ~padding
    scored[:, 0] = False
    assert torch.equal(batch["labels"][scored], batch["input_ids"][scored])


def test_captions_start_with_generations_start_token_and_end_with_its_stop_token(tiny, records):
    model, processor = tiny
    batch, _ = _batch(tiny, records)
    text_config = model.config.text_config
    assert (batch["input_ids"][:, 0] == text_config.bos_token_id).all()
    assert text_config.bos_token_id != processor.tokenizer.cls_token_id
    last = batch["attention_mask"].sum(1) - 1
    assert (batch["input_ids"][torch.arange(len(last)), last] == text_config.sep_token_id).all()
    # and generate() really starts from that token
    pixels = batch["pixel_values"][:2]
    generated = model.generate(pixel_values=pixels, max_new_tokens=2, min_new_tokens=2)
    assert (generated[:, 0] == text_config.bos_token_id).all()


def test_long_captions_are_cut_keeping_the_stop_token(tiny):
    model, family = tiny
    [ids] = family.training_sequences(["a red circle " * 20], 8)
    text_config = model.config.text_config
    assert len(ids) == 8 and ids[0] == text_config.bos_token_id and ids[-1] == text_config.sep_token_id


def test_training_and_generation_agree(tiny, records):
    """The decoder sees the same inputs in training as in generate(): same start token, same positions.

    Force generate() to emit a training caption token by token; its logits at each step must equal
    the training forward pass's logits for that caption. Training from another start token than
    generate() uses (e.g. the tokenizer's [CLS] instead of BLIP's [DEC]) fails this.
    """
    model, _ = tiny
    model.eval()
    batch, _ = _batch(tiny, records[:1])
    ids = batch["input_ids"][0][batch["attention_mask"][0] == 1]
    target = ids[1:].tolist()  # words and the stop token
    pixels = batch["pixel_values"][:1]
    generated = model.generate(pixel_values=pixels, num_beams=1, do_sample=False, max_new_tokens=len(target) + 5,
                               prefix_allowed_tokens_fn=lambda _, prefix: [target[min(len(prefix) - 1, len(target) - 1)]],
                               output_logits=True, return_dict_in_generate=True)
    assert generated.sequences[0].tolist() == ids.tolist()  # stops exactly at our stop token
    with torch.no_grad():
        image_embeds = model.vision_model(pixel_values=pixels).last_hidden_state
        training_logits = model.text_decoder(input_ids=ids[None], encoder_hidden_states=image_embeds).logits[0, :-1]
    generation_logits = torch.stack(generated.logits, dim=1)[0]
    assert torch.allclose(training_logits, generation_logits, atol=1e-4)


def test_encoding_each_image_once_gives_the_same_loss_and_gradient(tiny, records):
    model, family = tiny
    batch, _ = _batch(tiny, records[:3])
    shared = family.loss(model, batch)
    shared.backward()
    grads_shared = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    per_caption = model(pixel_values=batch["pixel_values"].repeat_interleave(batch["captions_per_image"], dim=0),
                        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    per_caption.backward()
    assert torch.allclose(shared, per_caption, atol=1e-6)
    vision_grads = 0
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        assert torch.allclose(grads_shared[name], param.grad, atol=1e-6, rtol=1e-4), name
        vision_grads += name.startswith("vision_model")
    assert vision_grads > 0
    model.zero_grad()


def test_epoch_order_depends_only_on_seed_and_epoch_and_resumes_mid_epoch():
    sampler = EpochBatchSampler(23, 4, seed=5)
    epoch0 = sampler.batches(0)
    assert sorted(i for b in epoch0 for i in b) == list(range(23))
    assert epoch0 != sampler.batches(1)
    assert EpochBatchSampler(23, 4, seed=5).batches(0) == epoch0
    sampler.set_epoch(0, skip_batches=2)
    assert list(sampler) == epoch0[2:] and len(sampler) == len(epoch0) - 2


def test_a_batch_smaller_than_the_processes_gives_each_image_to_one_process_and_stand_ins_to_the_others():
    world = 4
    last = [list(EpochBatchSampler(10, 8, seed=5, rank=rank, world=world))[-1] for rank in range(world)]
    real = [i for share in last for i in share if not isinstance(i, StandIn)]
    assert sorted(real) == sorted(EpochBatchSampler(10, 8, seed=5).batches(0)[-1])  # the 2 images, each once
    assert [len(share) for share in last] == [1] * world
    assert [isinstance(share[0], StandIn) for share in last] == [False, False, True, True]


def test_a_stand_in_batch_is_marked_and_a_real_one_is_not(tiny, records):
    _, family = tiny
    tokens = [family.training_sequences(r.captions, 40) for r in records]
    dataset = CaptionTrainingSet(records, ImageTransform(family.processor.image_processor), tokens)
    collate = CaptionCollator(family.pad_id, len(family.prefix))
    stand_in, real = collate([dataset[StandIn(2)]]), collate([dataset[2]])
    assert stand_in["stand_in"] and not real["stand_in"]
    assert torch.equal(stand_in["input_ids"], real["input_ids"])  # a real image: its loss is finite, weighted 0


# ---------------------------------------------------------------- BLIP's recipe: label smoothing and the prompt

def test_loss_is_cross_entropy_with_label_smoothing_over_the_caption_tokens(tiny, records):
    model, family = tiny
    batch, _ = _batch(tiny, records[:3])
    with torch.no_grad():
        features = family.encode_images(model, batch["pixel_values"]).repeat_interleave(batch["captions_per_image"], 0)
        logits = family.token_logits(model, features, batch["input_ids"], batch["attention_mask"])
        smoothed, plain = family.loss(model, batch, label_smoothing=0.1), family.loss(model, batch)
    # by hand: at each scored position, 0.9 x the target's log-probability + 0.1 x the mean over the vocabulary
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = batch["labels"][:, 1:]
    scored = targets != -100
    picked = log_probs.gather(2, targets.clamp(min=0)[..., None]).squeeze(2)
    expected = -(0.9 * picked + 0.1 * log_probs.mean(-1))[scored].mean()
    assert torch.allclose(smoothed, expected, atol=1e-5)
    assert torch.allclose(plain, -picked[scored].mean(), atol=1e-5)
    assert scored.sum() == (batch["attention_mask"][:, 1:] == 1).sum()  # every caption token and end token, no more


def test_label_smoothing_defaults_to_blips_0_1(tiny_blip, demo_data, tmp_path):
    from src.base.config import resolve, training_parser
    from src.base.families import apply_recipe
    from src.ft.method import METHOD
    args = training_parser("t").parse_args(["--data-dir", str(demo_data), "--output-dir", str(tmp_path)])
    config = resolve(METHOD, args)
    assert config.label_smoothing is None  # left to the family's recipe
    apply_recipe(config, METHOD, str(tiny_blip))
    assert config.label_smoothing == 0.1


@pytest.fixture(scope="module")
def prompted(tiny_blip):
    return load_family(tiny_blip, prompt="a picture of")


def test_a_prompt_starts_every_training_caption_and_is_not_scored(tiny, prompted, records):
    model, plain = tiny
    prompt_ids = prompted.word_ids(["a picture of"])[0]
    assert len(prompt_ids) == 3 and prompted.prefix == plain.prefix + prompt_ids
    batch, tokens = _batch((model, prompted), records[:2])
    assert all(ids[: len(prompted.prefix)] == prompted.prefix for per_image in tokens for ids in per_image)
    assert (batch["labels"][:, : len(prompted.prefix)] == -100).all()  # given, not predicted
    caption_tokens = batch["attention_mask"].sum(1) - len(prompted.prefix)  # words and the end token
    assert int((batch["labels"] != -100).sum()) == int(caption_tokens.sum())
    # the loss is the unprompted one's over the same caption tokens, only conditioned on the prompt
    unprompted, _ = _batch(tiny, records[:2])
    assert int((unprompted["labels"][:, 1:] != -100).sum()) == int(caption_tokens.sum())


def test_generation_starts_from_the_prompt_and_captions_come_without_it(tiny, prompted, records):
    model, _ = tiny
    model.eval()
    batch, _ = _batch(tiny, records[:2])
    sequences = prompted.generate(model, batch["pixel_values"], num_beams=2, max_new_tokens=6, min_new_tokens=6)
    assert (sequences[:, : len(prompted.prefix)] == torch.tensor(prompted.prefix)).all()
    captions = prompted.decode(sequences)
    words = [prompted.tokenizer.decode(row[len(prompted.prefix):], skip_special_tokens=True) for row in sequences.tolist()]
    assert [c.split() for c in captions] == [w.split() for w in words]  # exactly what followed the prompt
    samples = prompted.sample(model, prompted.encode_images(model, batch["pixel_values"]), 2, 5)
    assert (samples[:, : len(prompted.prefix)] == torch.tensor(prompted.prefix)).all() and samples.shape[0] == 4

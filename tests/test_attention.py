"""BLIP's fused attention (src/base/families/blip.py use_fused_attention): torch's scaled_dot_product_attention in
place of transformers' explicit softmax(QK^T)V, in the vision encoder and in the text decoder's self- and
cross-attention. Same outputs, gradients and captions as transformers' own attention, on the same weights."""
import logging

import pytest
import torch

import src.base.families.blip as blip
from conftest import SAMPLE, family_caption_batch, random_images
from src.base.data import ImageTransform, load_split
from src.base.families import load_family
from src.base.families.blip import Blip
from src.base.lora import add_lora

VOCAB = ["a", "red", "circle", "on", "white", "blue", "square", "the", "of"]


@pytest.fixture(scope="module")
def family(tiny_blip):
    return load_family(tiny_blip)


def _text_attentions(model):
    from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention
    return [m for m in model.modules() if isinstance(m, BlipTextSelfAttention)]


def _sharpen(*models, factor=4.0):
    """Scale the text decoder's query and key weights (the same in every model): the untrained tiny model attends
    almost uniformly, where a wrong scale or a lost mask would change little; sharper attention makes them show."""
    for model in models:
        with torch.no_grad():
            for name, weight in model.text_decoder.named_parameters():
                if name.endswith(("query.weight", "key.weight")):
                    weight.mul_(factor)
    return models


def _pair(tiny_blip):
    """transformers' attention and ours, on the same weights."""
    plain, fused = Blip.load_model(tiny_blip, fused_attention=False), Blip.load_model(tiny_blip)
    assert all(m.forward.__func__ is blip._fused_text_attention for m in _text_attentions(fused))
    assert not any("forward" in vars(m) for m in _text_attentions(plain))
    return plain, fused


def _decoder_batch(family):
    """A training batch as the engine builds it (captions of different lengths: padding) and image features per
    caption. No image-token mask: the engine passes none, generate() all ones, and transformers 5.24 does not
    hand it on to the cross-attention anyway (BlipTextAttention calls its BlipTextSelfAttention without
    encoder_attention_mask), so the cross-attention runs unmasked in both implementations."""
    torch.manual_seed(0)
    batch = family_caption_batch(family, [2, 1, 3], VOCAB)
    assert (batch["attention_mask"] == 0).any(), "captions of different lengths: some padding"
    tokens = (family.config.vision_config.image_size // family.config.vision_config.patch_size) ** 2 + 1
    features = torch.randn(batch["input_ids"].shape[0], tokens, family.config.vision_config.hidden_size)
    return batch, features


def _logits_and_gradients(model, batch, features):
    features = features.clone().requires_grad_()
    logits = model.text_decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                encoder_hidden_states=features).logits
    (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    grads = {name: p.grad for name, p in model.text_decoder.named_parameters() if p.grad is not None}
    return logits.detach(), features.grad, grads


def test_fused_vision_attention_matches_transformers_attention(tiny_blip):
    """Same outputs and gradients as transformers' own BlipAttention, to float rounding."""
    plain, fused = Blip.load_model(tiny_blip, fused_attention=False), Blip.load_model(tiny_blip)
    pixels = torch.randn(3, 3, 32, 32)
    out_plain = plain.vision_model(pixel_values=pixels).last_hidden_state
    out_fused = fused.vision_model(pixel_values=pixels).last_hidden_state
    assert out_plain.abs().max() > 0.1  # a real signal, not near-zero activations
    assert torch.allclose(out_plain, out_fused, atol=1e-5)
    out_plain.square().sum().backward()
    out_fused.square().sum().backward()
    for (name, a), b in zip(plain.vision_model.named_parameters(), fused.vision_model.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-4, rtol=1e-4), name


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fused_text_attention_matches_transformers_attention(tiny_blip, family, mode):
    """The text decoder's logits, and the gradients of its weights and of the image features, agree with
    transformers' attention to float rounding, on padded captions; in training mode
    (BLIP's attention dropout is 0) and in eval mode."""
    plain, fused = _sharpen(*_pair(tiny_blip))
    assert all(m.dropout.p == 0 for m in _text_attentions(fused))
    batch, features = _decoder_batch(family)
    for model in (plain, fused):
        model.train(mode == "train")
    logits_plain, features_plain, grads_plain = _logits_and_gradients(plain, batch, features)
    logits_fused, features_fused, grads_fused = _logits_and_gradients(fused, batch, features)
    assert logits_plain.abs().max() > 0.1
    torch.testing.assert_close(logits_fused, logits_plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features_fused, features_plain, atol=1e-5, rtol=1e-4)
    assert grads_fused.keys() == grads_plain.keys() and len(grads_plain) > 20
    for name in grads_plain:
        torch.testing.assert_close(grads_fused[name], grads_plain[name], atol=1e-5, rtol=1e-4, msg=name)


def test_fused_text_attention_under_bf16_autocast_gets_its_mask_in_the_querys_dtype(tiny_blip, family, monkeypatch):
    """Under autocast the query is bf16 while transformers' additive mask is fp32 (the embeddings' dtype); the
    mask reaches the kernel as bf16, its fp32 minimum clamped to bf16's (finite, not -inf). Logits and backward
    as with transformers' attention, to bf16 rounding."""
    plain, fused = _sharpen(*_pair(tiny_blip))
    batch, features = _decoder_batch(family)
    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, **kwargs):
        seen.append((query.dtype, None if attn_mask is None else attn_mask.dtype,
                     None if attn_mask is None else bool(torch.isfinite(attn_mask).all())))
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = {name: model.text_decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                           encoder_hidden_states=features).logits
                  for name, model in [("plain", plain), ("fused", fused)]}
    assert logits["fused"].dtype == torch.bfloat16
    # 2 layers x (self-attention: the causal and padding mask; cross-attention: none); the plain model never calls it
    assert seen == [(torch.bfloat16, torch.bfloat16, True), (torch.bfloat16, None, None)] * 2
    torch.testing.assert_close(logits["fused"].float(), logits["plain"].float(), atol=0.05, rtol=0.02)
    logits["fused"].float().square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in fused.text_decoder.parameters() if p.grad is not None)


def _sample_pixels(family):
    """The real VizWiz sample photos, as the tiny model sees them."""
    transform = ImageTransform(family.processor.image_processor)
    return torch.stack([transform(transform.load(r.path)) for r in load_split(SAMPLE, "val")])


@pytest.mark.parametrize("num_beams", [1, 3])
def test_fused_text_attention_generates_the_same_captions(tiny_blip, family, num_beams):
    """Greedy and beam search through the family's generate() (the self-attention cache growing a token at a time,
    the image's cross-attention keys and values computed once and reused): token-identical captions on the real
    sample photos. In float64: the untrained model's beams are near ties, which float32 rounding alone can flip."""
    plain, fused = (model.double().eval() for model in _sharpen(*_pair(tiny_blip), factor=8.0))
    pixels = _sample_pixels(family).double()
    assert len(pixels) == 15
    key_calls = {}
    for name, model in [("plain", plain), ("fused", fused)]:
        for layer in model.text_decoder.bert.encoder.layer:
            layer.crossattention.self.key.register_forward_hook(
                lambda *_, name=name: key_calls.__setitem__(name, key_calls.get(name, 0) + 1))
    captions = {name: family.generate(model, pixels, num_beams=num_beams, max_new_tokens=12)
                for name, model in [("plain", plain), ("fused", fused)]}
    assert captions["plain"].shape[1] > 5
    assert len({tuple(c) for c in captions["plain"].tolist()}) > 1  # the images matter: not one caption for all
    assert torch.equal(captions["fused"], captions["plain"])
    assert key_calls["fused"] == key_calls["plain"] == 2  # once per layer per generate() call: the cache is reused


def test_fused_text_attention_with_lora(tiny_blip, family):
    """LoRA wraps the query and value projections; the fused forward calls them, so its adapters take part: same
    logits and adapter gradients as with transformers' attention."""
    plain, fused = _sharpen(*_pair(tiny_blip))
    models = []
    for model in (plain, fused):
        torch.manual_seed(0)
        model = add_lora(model, 4, 8, 0.0, list(Blip.lora_targets))
        with torch.no_grad():  # B starts at zero (the adapter does nothing): give it weights, the same in both
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.linspace(-0.5, 0.5, param.numel()).reshape(param.shape))
        models.append(model.train())
    attention = _text_attentions(models[1])
    assert all(m.forward.__func__ is blip._fused_text_attention for m in attention)
    assert all(hasattr(m.query, "lora_A") and hasattr(m.value, "lora_A") for m in attention)
    batch, features = _decoder_batch(family)
    results = []
    for model in models:
        logits = family.token_logits(model, features, batch["input_ids"], batch["attention_mask"])
        logits.square().mean().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (logits_plain, grads_plain), (logits_fused, grads_fused) = results
    with models[0].disable_adapter():  # the adapters change the logits: the check would see a lost adapter
        bare = family.token_logits(models[0], features, batch["input_ids"], batch["attention_mask"]).detach()
    assert (bare - logits_plain).abs().max() > 1e-3
    torch.testing.assert_close(logits_fused, logits_plain, atol=1e-5, rtol=1e-5)
    assert len(grads_plain) == 16 and grads_fused.keys() == grads_plain.keys()  # A and B of 2 x 2 x 2 projections
    for name in grads_plain:
        torch.testing.assert_close(grads_fused[name], grads_plain[name], atol=1e-5, rtol=1e-4, msg=name)


def test_fused_text_attention_drops_attention_with_the_modules_dropout_in_training_only(tiny_blip, family,
                                                                                        monkeypatch):
    """With an attention dropout of 0.3 (BLIP's is 0), the kernel gets dropout_p=0.3 in training mode and 0 in
    eval mode: two training forwards with different seeds differ, eval ones do not, and eval matches transformers."""
    plain, fused = _pair(tiny_blip)
    for model in (plain, fused):
        for module in _text_attentions(model):
            module.dropout.p = 0.3
    batch, features = _decoder_batch(family)
    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(*args, dropout_p=0.0, **kwargs):
        seen.append(dropout_p)
        return sdpa(*args, dropout_p=dropout_p, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)

    def logits(model, seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return family.token_logits(model, features, batch["input_ids"], batch["attention_mask"])

    fused.train()
    first, second = logits(fused, 0), logits(fused, 1)
    assert seen == [0.3] * 8
    assert (first - second).abs().max() > 1e-3
    fused.eval(), plain.eval()
    seen.clear()
    assert torch.equal(logits(fused, 0), logits(fused, 1))
    assert seen == [0.0] * 8
    torch.testing.assert_close(logits(fused, 0), logits(plain, 0), atol=1e-5, rtol=1e-5)


def test_output_attentions_falls_back_to_transformers_attention(tiny_blip, family):
    """The fused kernel forms no attention probabilities: a call that asks for them (output_attentions=True) runs
    transformers' forward, so the text decoder and the vision encoder still return them; other calls stay fused."""
    plain, fused = _pair(tiny_blip)
    batch, features = _decoder_batch(family)
    pixels, out = random_images(family, 2), {}
    for name, model in [("plain", plain), ("fused", fused)]:
        model.eval()
        text = model.text_decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  encoder_hidden_states=features, output_attentions=True)
        vision = model.vision_model(pixel_values=pixels, output_attentions=True)
        out[name] = (text.attentions, text.cross_attentions, vision.attentions)
    for got, expected in zip(out["fused"], out["plain"]):
        assert len(got) == len(expected) == 2
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b)


def test_an_unknown_transformers_text_attention_keeps_its_own_forward_and_says_so_once(tiny_blip, monkeypatch):
    """The fused text forward copies transformers 5.24's; where the installed BlipTextSelfAttention.forward takes
    other arguments, it is left alone (one info line), and the vision encoder is still fused."""
    monkeypatch.setattr(blip, "_TEXT_FORWARD_PARAMETERS", ["self", "hidden_states", "past_key_values"])
    blip._text_attention_mismatch.cache_clear()
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    blip.log.addHandler(handler)
    level, blip.log.level = blip.log.level, logging.INFO
    try:
        models = [Blip.load_model(tiny_blip), Blip.load_model(tiny_blip)]
    finally:
        blip.log.removeHandler(handler)
        blip.log.setLevel(level)
        blip._text_attention_mismatch.cache_clear()
    for model in models:
        assert not any("forward" in vars(m) for m in _text_attentions(model))
        assert all(m.forward.__func__ is blip._fused_vision_attention
                   for m in model.vision_model.modules() if "forward" in vars(m))
        assert sum("forward" in vars(m) for m in model.vision_model.modules()) == 2
    assert len(lines) == 1 and "keeps transformers' own attention" in lines[0], lines

"""BLIP (Salesforce/blip-image-captioning-base and -large): a ViT image encoder and a BERT-style text decoder
that cross-attends to the image features."""
import functools
import inspect
import math
import types

import torch
import transformers
from transformers import BlipForConditionalGeneration, BlipProcessor

from ..helpers import log
from ..modeling import core_model, load_pretrained, load_weights
from .base import Family

# transformers internals the fused attention relies on; without them it is not applied (_text_attention_mismatch)
try:  # where transformers 5 announces output_attentions to the attention modules (see _attentions_requested)
    from transformers.utils.output_capturing import _active_collector
except ImportError:
    _active_collector = None
try:
    from transformers.cache_utils import EncoderDecoderCache
except ImportError:
    EncoderDecoderCache = None


class Blip(Family):
    name = "BLIP"
    model_types = ("blip",)
    lora_targets = ("query", "value")   # the text decoder's self- and cross-attention projections
    checkpoints = ("Salesforce/blip-image-captioning-base", "Salesforce/blip-image-captioning-large")
    module_groups = {"vision": ("vision_model.",), "text": ("text_decoder.",)}
    # LAVIS's caption fine-tuning (no warm-up steps: its runner's default is 0). Its generate() counts the prompt's
    # 4 tokens ([DEC] a picture of) in max_len 20 and min_len 5: 16 and 1 new tokens.
    recipe = dict(lr=1e-5, lr_schedule="cosine", warmup_ratio=0.0, weight_decay=0.05, label_smoothing=0.1,
                  prompt="a picture of", num_beams=3, max_new_tokens=16, min_new_tokens=1)
    recipe_source = "LAVIS lavis/projects/blip/train/caption_coco_ft.yaml"
    recipe_sources = {"label_smoothing": "LAVIS lavis/models/med.py (CrossEntropyLoss(label_smoothing=0.1))"}

    @classmethod
    def recipe_for(cls, config):
        """BLIP-large (ViT-L, 1024 wide) is fine-tuned at a fifth of BLIP-base's rate."""
        recipe = super().recipe_for(config)
        if config.vision_config.hidden_size >= 1024:
            recipe["lr"] = (2e-6, "LAVIS lavis/projects/blip/train/caption_coco_large_ft.yaml")
        return recipe

    @classmethod
    def load_model(cls, checkpoint, fused_attention=True):
        model = load_weights(BlipForConditionalGeneration, checkpoint, "BLIP captioning model")
        return use_fused_attention(model) if fused_attention else model

    @classmethod
    def load_processor(cls, checkpoint):
        return load_pretrained(BlipProcessor, checkpoint, "BLIP processor")

    # BlipForConditionalGeneration.generate() starts the decoder from text_config.bos_token_id ([DEC], which the
    # bert-base-uncased tokenizer does not know) and stops at text_config.sep_token_id ([SEP]): train with the
    # same two, not the tokenizer's [CLS].
    def start_ids(self):
        return [self.config.text_config.bos_token_id]

    @property
    def end_id(self):
        return self.config.text_config.sep_token_id

    @property
    def pad_id(self):
        return self.config.text_config.pad_token_id

    def encode_images(self, model, pixel_values):
        return core_model(model).vision_model(pixel_values=pixel_values).last_hidden_state

    def token_logits(self, model, image_features, input_ids, attention_mask):
        # use_cache=False: a training forward has no next step to reuse the keys and values for
        return core_model(model).text_decoder(input_ids=input_ids, attention_mask=attention_mask,
                                              encoder_hidden_states=image_features, use_cache=False).logits

    def _decode_from_prefix(self, model, image_features, starts=None, **settings):
        """The text decoder's generate() from `prefix` (or `starts`), as BlipForConditionalGeneration.generate() calls
        it."""
        start = self.first_tokens(image_features.shape[0], image_features.device, starts)
        return core_model(model).text_decoder.generate(
            input_ids=start, eos_token_id=self.end_id, pad_token_id=self.pad_id, encoder_hidden_states=image_features,
            encoder_attention_mask=torch.ones(image_features.shape[:2], dtype=torch.long, device=image_features.device),
            **settings)

    @torch.no_grad()
    def generate(self, model, pixel_values, num_beams=3, max_new_tokens=30, min_new_tokens=0, starts=None, **decoding):
        return self._decode_from_prefix(model, self.encode_images(model, pixel_values), starts, num_beams=num_beams,
                                        max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                        do_sample=False, **decoding)

    @torch.no_grad()
    def sample(self, model, image_features, samples_per_image, max_new_tokens, greedy=False, temperature=1.0,
               starts=None):
        sampling = dict(do_sample=False) if greedy else dict(do_sample=True, top_k=0, top_p=1.0, temperature=temperature)
        return self._decode_from_prefix(model, image_features.repeat_interleave(samples_per_image, dim=0), starts,
                                        num_beams=1,
                                        max_new_tokens=max_new_tokens, min_new_tokens=0, **sampling)


    def legacy_weights(self, model):
        """transformers 5 ties BLIP's LM head to the word embeddings and leaves it out of the saved file; 4.x does
        not tie it, starts it at random (with only a warning) and every caption is wrong. Save the head's own copy."""
        text = core_model(model).text_decoder
        head = text.cls.predictions.decoder.weight
        if head is not text.bert.embeddings.word_embeddings.weight:
            return {}  # not tied: save_pretrained writes it itself
        return {"text_decoder.cls.predictions.decoder.weight": head.detach().clone()}


def _attentions_requested():
    """Whether the model call in progress was asked for attention probabilities (output_attentions=True).
    transformers 5 collects them with forward hooks on the attention modules, announced through this context
    variable; the fused kernel never forms the probabilities, so such a call takes transformers' own forward."""
    collecting = _active_collector.get() if _active_collector is not None else None
    return bool(collecting) and ("attentions" in collecting or "cross_attentions" in collecting)


def _fused_vision_attention(self, hidden_states, **kwargs):
    """BlipAttention.forward with torch's fused scaled_dot_product_attention: same maths, no N x N matrix in memory."""
    if _attentions_requested():
        return type(self).forward(self, hidden_states, **kwargs)
    batch, tokens, width = hidden_states.shape
    q, k, v = self.qkv(hidden_states).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    context = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, dropout_p=self.dropout.p if self.training else 0.0, scale=self.scale)
    return self.projection(context.transpose(1, 2).reshape(batch, tokens, width)), None


def _fused_text_attention(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                          encoder_attention_mask=None, cache=None, **kwargs):
    """BlipTextSelfAttention.forward of transformers 5.24 (the text decoder's self- and cross-attention) with torch's
    fused scaled_dot_product_attention in place of softmax(QK^T / sqrt(d) + mask) -> dropout -> x V. The cache
    handling is transformers' own, line for line: the self-attention cache grows by the new tokens' keys and values;
    the cross-attention keys and values of the image are computed on the first call of a generation and reused
    (`is_updated`) afterwards. Returns no attention probabilities: a call that asks for them runs transformers' own
    forward instead."""
    if "past_key_values" in kwargs:  # the name transformers' decorator still accepts (deprecated until 5.40)
        cache = kwargs.pop("past_key_values")
    if _attentions_requested():
        return type(self).forward(self, hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                  cache, **kwargs)
    input_shape = hidden_states.shape[:-1]
    query_layer = self.query(hidden_states).view(*input_shape, -1, self.attention_head_size).transpose(1, 2)

    is_cross_attention = encoder_hidden_states is not None
    attention_mask = encoder_attention_mask if is_cross_attention else attention_mask

    # --- from transformers 5.24's forward, unchanged
    is_updated = False
    if cache is not None:
        if isinstance(cache, EncoderDecoderCache):
            is_updated = cache.is_updated.get(self.layer_idx)
            curr_cache = cache.cross_attention_cache if is_cross_attention else cache.self_attention_cache
        else:
            curr_cache = cache

    current_states = encoder_hidden_states if is_cross_attention else hidden_states
    if is_cross_attention and cache is not None and is_updated:
        key_layer = curr_cache.layers[self.layer_idx].keys
        value_layer = curr_cache.layers[self.layer_idx].values
    else:
        kv_shape = (*current_states.shape[:-1], -1, self.attention_head_size)
        key_layer = self.key(current_states).view(kv_shape).transpose(1, 2)
        value_layer = self.value(current_states).view(kv_shape).transpose(1, 2)
        if cache is not None:
            key_layer, value_layer = curr_cache.update(key_layer, value_layer, self.layer_idx, kwargs=kwargs)
            if is_cross_attention and isinstance(cache, EncoderDecoderCache):
                cache.is_updated[self.layer_idx] = True
    # ---

    if attention_mask is not None:
        # transformers' additive mask (0 / the dtype's minimum) comes in the embeddings' dtype: fp32 under autocast,
        # where the query is bf16. SDPA wants the query's dtype (or bool); clamp first so that fp32's minimum
        # becomes bf16's minimum, not -inf: a fully masked row then averages the values as transformers' does
        # (with -inf the kernel gives zeros or NaN).
        attention_mask = attention_mask.to(query_layer.device)
        if attention_mask.is_floating_point() and attention_mask.dtype != query_layer.dtype:
            attention_mask = attention_mask.clamp(min=torch.finfo(query_layer.dtype).min).to(query_layer.dtype)
    context = torch.nn.functional.scaled_dot_product_attention(
        query_layer, key_layer, value_layer, attn_mask=attention_mask,
        dropout_p=self.dropout.p if self.training else 0.0, scale=1 / math.sqrt(self.attention_head_size))
    return context.transpose(1, 2).reshape(*input_shape, self.all_head_size), None


# What _fused_text_attention was written against: transformers 5.24's BlipTextSelfAttention.
_TEXT_FORWARD_PARAMETERS = ["self", "hidden_states", "attention_mask", "encoder_hidden_states",
                            "encoder_attention_mask", "cache", "kwargs"]
_TEXT_ATTRIBUTES = ("query", "key", "value", "dropout", "attention_head_size", "all_head_size", "layer_idx")


@functools.cache
def _text_attention_mismatch():
    """Why the installed BlipTextSelfAttention is not the one _fused_text_attention copies, or None if it is.
    Decided (and logged) once per process."""
    from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention

    parameters = list(inspect.signature(BlipTextSelfAttention.forward).parameters)
    if parameters != _TEXT_FORWARD_PARAMETERS:
        reason = f"its forward takes ({', '.join(parameters)})"
    elif _active_collector is None:
        reason = "transformers.utils.output_capturing._active_collector is gone (needed for output_attentions)"
    elif EncoderDecoderCache is None:
        reason = "transformers.cache_utils.EncoderDecoderCache is gone"
    else:
        return None
    log.info(f"BLIP text decoder keeps transformers' own attention: BlipTextSelfAttention of transformers "
             f"{transformers.__version__} is not the one the fused forward was written for (5.24): {reason}")
    return reason


def use_fused_attention(model):
    """Give BLIP's attention torch's fused scaled_dot_product_attention (transformers runs it as explicit
    softmax(QK^T)V): the vision encoder's, and the text decoder's self- and cross-attention.

    The vision encoder attends over 577 tokens (BLIP at 384 px), most of BLIP's arithmetic; every caption token
    cross-attends to those 577 image tokens in each decoder layer. The fused kernel needs far less memory (no
    N x M probabilities formed and kept for backward) and fewer passes over it. Outputs, gradients and generated
    captions agree with transformers' own attention (tests/test_attention.py). The text decoder's forward is a copy
    of transformers 5.24's with only the attention arithmetic replaced, so it is applied only where the installed
    class matches that version (_text_attention_mismatch); otherwise transformers' own stays, with one line in the
    log. Works on a bare model, its text decoder alone, or a PEFT-wrapped one (LoRA wraps query/value; the forward
    calls them as before).
    """
    from transformers.models.blip.modeling_blip import BlipAttention
    from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention

    lacking = set()
    for module in model.modules():
        if isinstance(module, BlipAttention):
            module.forward = types.MethodType(_fused_vision_attention, module)
        elif isinstance(module, BlipTextSelfAttention) and _text_attention_mismatch() is None:
            missing = {name for name in _TEXT_ATTRIBUTES if not hasattr(module, name)}
            if missing:
                lacking |= missing
                continue
            module.forward = types.MethodType(_fused_text_attention, module)
    if lacking:
        log.info(f"BLIP text attention without {', '.join(sorted(lacking))}: transformers' own attention kept there")
    return model

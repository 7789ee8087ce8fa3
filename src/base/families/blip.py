"""BLIP (Salesforce/blip-image-captioning-base and -large): a ViT image encoder and a BERT-style text decoder
that cross-attends to the image features."""
import types

import torch
from transformers import BlipForConditionalGeneration, BlipProcessor

from ..modeling import core_model, load_pretrained
from .base import Family


class Blip(Family):
    name = "BLIP"
    model_types = ("blip",)
    lora_targets = ("query", "value")   # the text decoder's self- and cross-attention projections

    @classmethod
    def load_model(cls, checkpoint, fused_attention=True):
        model = load_pretrained(BlipForConditionalGeneration, checkpoint, "BLIP captioning model")
        return use_fused_vision_attention(model) if fused_attention else model

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
        return core_model(model).text_decoder(input_ids=input_ids, attention_mask=attention_mask,
                                              encoder_hidden_states=image_features).logits

    def _decode_from_prefix(self, model, image_features, **settings):
        """The text decoder's generate() from `prefix`, as BlipForConditionalGeneration.generate() calls it."""
        start = torch.tensor([self.prefix], device=image_features.device).expand(image_features.shape[0], -1)
        return core_model(model).text_decoder.generate(
            input_ids=start, eos_token_id=self.end_id, pad_token_id=self.pad_id, encoder_hidden_states=image_features,
            encoder_attention_mask=torch.ones(image_features.shape[:2], dtype=torch.long, device=image_features.device),
            **settings)

    @torch.no_grad()
    def generate(self, model, pixel_values, num_beams=3, max_new_tokens=30, min_new_tokens=0, **decoding):
        return self._decode_from_prefix(model, self.encode_images(model, pixel_values), num_beams=num_beams,
                                        max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                        do_sample=False, **decoding)

    @torch.no_grad()
    def sample(self, model, image_features, samples_per_image, max_new_tokens, greedy=False, temperature=1.0):
        sampling = dict(do_sample=False) if greedy else dict(do_sample=True, top_k=0, top_p=1.0, temperature=temperature)
        return self._decode_from_prefix(model, image_features.repeat_interleave(samples_per_image, dim=0), num_beams=1,
                                        max_new_tokens=max_new_tokens, min_new_tokens=0, **sampling)


    def legacy_weights(self, model):
        """transformers 5 ties BLIP's LM head to the word embeddings and leaves it out of the saved file; 4.x does
        not tie it, starts it at random (with only a warning) and every caption is wrong. Save the head's own copy."""
        text = core_model(model).text_decoder
        head = text.cls.predictions.decoder.weight
        if head is not text.bert.embeddings.word_embeddings.weight:
            return {}  # not tied: save_pretrained writes it itself
        return {"text_decoder.cls.predictions.decoder.weight": head.detach().clone()}


def _fused_vision_attention(self, hidden_states, **kwargs):
    """BlipAttention.forward with torch's fused scaled_dot_product_attention: same maths, no N x N matrix in memory."""
    batch, tokens, width = hidden_states.shape
    q, k, v = self.qkv(hidden_states).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    context = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, dropout_p=self.dropout.p if self.training else 0.0, scale=self.scale)
    return self.projection(context.transpose(1, 2).reshape(batch, tokens, width)), None


def use_fused_vision_attention(model):
    """Give BLIP's vision encoder fused attention (transformers runs it as explicit softmax(QK^T)V).

    The vision encoder attends over 577 tokens (BLIP at 384 px), most of BLIP's arithmetic;
    the fused kernel is faster and needs far less memory. Outputs agree to float rounding (tested).
    """
    from transformers.models.blip.modeling_blip import BlipAttention

    for module in core_model(model).vision_model.modules():
        if isinstance(module, BlipAttention):
            module.forward = types.MethodType(_fused_vision_attention, module)
    return model

"""BLIP captioner: loading, the training loss, caption generation, LoRA."""
import logging
import types
import warnings
from pathlib import Path

import torch
from transformers import BlipForConditionalGeneration, BlipProcessor
from transformers.utils import logging as hf_logging

from .helpers import UserError

# transformers warns that BlipImageProcessor falls back to its Pillow backend without torchvision;
# we only read the processor's settings (data.ImageTransform does the pixels), so that is expected.
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()  # "Loading weights" bars: noise in job logs


def _load(loader, checkpoint, what, **kwargs):
    """`loader.from_pretrained(checkpoint)`, with a one-line UserError when `checkpoint` cannot be loaded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return loader.from_pretrained(checkpoint, **kwargs)
    except (OSError, ValueError, EnvironmentError) as error:
        where = "local directory" if Path(checkpoint).exists() else "Hugging Face hub name (or local directory)"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"--checkpoint {checkpoint}: cannot load the {what} from this {where}: {reason}")


def load_processor(checkpoint):
    return _load(BlipProcessor, checkpoint, "BLIP processor")


def load_captioner(checkpoint, fused_attention=True):
    model = _load(BlipForConditionalGeneration, checkpoint, "BLIP captioning model")
    return use_fused_vision_attention(model) if fused_attention else model


def legacy_tied_weights(model):
    """Weights that transformers 5 leaves out of a saved BLIP because they are tied, but transformers 4.x needs.

    4.x does not tie BLIP's LM head to the word embeddings: loading a file without the head's own copy, it
    starts the head at random (with only a warning) and every caption is wrong. Returns {name: copy} to save
    beside the model's weights; empty when the head is not tied (save_pretrained then writes it itself).
    """
    text = core_model(model).text_decoder
    head = text.cls.predictions.decoder.weight
    if head is not text.bert.embeddings.word_embeddings.weight:
        return {}
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


def core_model(model):
    """The BlipForConditionalGeneration inside `model` (unwraps a PEFT model; LoRA layers stay in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def enable_activation_checkpointing(model):
    """Recompute each layer's activations during backward: far less memory for about a third more compute.

    Non-reentrant checkpointing, so LoRA's adapters get gradients although the layers' inputs need none.
    """
    core_model(model).activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def parameter_summary(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def caption_loss(model, batch):
    """Mean cross-entropy over caption tokens, encoding each image once.

    A batch holds several captions per image; the vision encoder (most of BLIP's arithmetic)
    runs once per image and its output is repeated for that image's captions. The gradient is
    the same as encoding the image once per caption, because repeat_interleave sums gradients.
    """
    blip = core_model(model)
    image_embeds = blip.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state
    image_embeds = image_embeds.repeat_interleave(batch["captions_per_image"], dim=0)
    output = blip.text_decoder(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        encoder_hidden_states=image_embeds,
        labels=batch["labels"],
        reduction="mean",
    )
    return output.loss


def decoder_token_ids(model):
    """(start, end, pad) token ids the decoder is trained and generates with.

    BlipForConditionalGeneration.generate() replaces the first input token by
    text_config.bos_token_id ([DEC]) and stops at text_config.sep_token_id ([SEP]); training
    must use the same two, not the tokenizer's [CLS].
    """
    text_config = core_model(model).config.text_config
    return text_config.bos_token_id, text_config.sep_token_id, text_config.pad_token_id


@torch.no_grad()
def generate_captions(model, pixel_values, tokenizer, num_beams, max_new_tokens, min_new_tokens):
    """Captions for a batch of images, one string each."""
    token_ids = core_model(model).generate(
        pixel_values=pixel_values,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        do_sample=False,
    )
    return [caption.strip() for caption in tokenizer.batch_decode(token_ids, skip_special_tokens=True)]


@torch.no_grad()
def sample_sequences(model, image_embeds, samples_per_image, max_new_tokens, greedy=False):
    """Token ids of captions drawn from the decoder (pure sampling, or greedy), `samples_per_image` per image.

    `image_embeds` are the vision encoder's outputs, so that a training step that also needs
    them with gradients encodes each image once. Rows are grouped by image: image 0's samples first.
    """
    blip = core_model(model)
    bos, eos, pad = decoder_token_ids(model)
    embeds = image_embeds.repeat_interleave(samples_per_image, dim=0)
    start = torch.full((embeds.shape[0], 1), bos, dtype=torch.long, device=embeds.device)
    sampling = dict(do_sample=False, num_beams=1) if greedy else dict(do_sample=True, num_beams=1, top_k=0, top_p=1.0,
                                                                       temperature=1.0)
    return blip.text_decoder.generate(
        input_ids=start, eos_token_id=eos, pad_token_id=pad, max_new_tokens=max_new_tokens, min_new_tokens=0,
        encoder_hidden_states=embeds, encoder_attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long,
                                                                        device=embeds.device), **sampling)


def sequence_log_probs(model, image_embeds, sequences):
    """Log-probability of each generated caption (its tokens up to and including the first end token), with gradients.

    `image_embeds` has one row per sequence. Tokens after the end token are padding and do not count.
    """
    blip = core_model(model)
    _, eos, _ = decoder_token_ids(model)
    targets = sequences[:, 1:]
    is_end = (targets == eos).long()
    counted = (is_end.cumsum(dim=1) - is_end) == 0  # up to and including the first end token
    attention_mask = torch.cat([torch.ones_like(targets[:, :1]), counted.long()], dim=1)
    logits = blip.text_decoder(input_ids=sequences, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                               return_logits=True, use_cache=False)
    token_log_probs = torch.log_softmax(logits.float(), dim=-1).gather(2, targets.unsqueeze(2)).squeeze(2)
    return (token_log_probs * counted).sum(dim=1)


def add_lora(model, r, alpha, dropout, targets):
    """Wrap `model` with LoRA adapters on the modules whose names end with `targets` (BLIP: query, value)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", target_modules=list(targets))
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        raise UserError(f"--lora-targets {','.join(targets)}: {str(error).splitlines()[0]}")


def load_lora(adapter_dir, base_checkpoint=None, trainable=False):
    """A LoRA adapter saved by save_pretrained, over its base checkpoint (from adapter_config.json unless given)."""
    from peft import PeftConfig, PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir}: no adapter_config.json here (not a LoRA adapter saved by src.peft)")
    base = base_checkpoint or PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(load_captioner(base), adapter_dir, is_trainable=trainable)


logging.getLogger("peft").setLevel(logging.ERROR)

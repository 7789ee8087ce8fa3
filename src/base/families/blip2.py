"""BLIP-2 (Salesforce/blip2-opt-2.7b): a frozen ViT image encoder, a Q-Former whose few learned query tokens
read the image, and a projection of the queries' outputs into an OPT language model, where they come first,
before the caption's tokens (transformers writes them into `<image>` placeholder tokens at the start of
input_ids; the placeholders only mark where: the language model sees [projected queries ; text embeddings]).

Too large to train every weight on one GPU (3.7B parameters): src.ft trains the parts its authors fine-tune (the
Q-Former and the projection, OPT frozen: `recipe` below), src.peft LoRA adapters on OPT's attention.

Tokens are OPT's (GPT-2 byte-level BPE): a caption starts with `</s>` (text_config.bos_token_id, 2, which OPT's
tokenizer prepends) and ends with what generation stops at, text_config.eos_token_id: 50118, the newline, in
blip2-opt-2.7b's config, as BLIP-2 was trained (LAVIS appends "\\n" to every caption). The tokenizer round-trips
text, so captions are trained as written and decoded captions are only stripped.
"""
import torch
from transformers import Blip2ForConditionalGeneration, Blip2Processor
from transformers.cache_utils import DynamicCache

from .. import constants as C
from ..helpers import UserError
from ..modeling import core_model, load_pretrained, load_weights
from .base import Family

# LoRA on the Q-Former too: --lora-targets q_proj,v_proj,query,value (the Q-Former's self- and cross-attention
# are named query/key/value, the ViT's fused qkv, OPT's q_proj/k_proj/v_proj: suffixes that match one part only).
QFORMER_LORA_TARGETS = ("q_proj", "v_proj", "query", "value")


class Blip2(Family):
    name = "BLIP-2"
    model_types = ("blip-2",)
    lora_targets = ("q_proj", "v_proj")   # OPT's self-attention only (the ViT uses qkv, the Q-Former query/value)
    full_fine_tuning = False
    checkpoints = ("Salesforce/blip2-opt-2.7b",)
    # LAVIS's Q-Former is the query tokens, the Q-Former and ln_vision (transformers' vision post_layernorm)
    module_groups = {"qformer": ("query_tokens", "qformer.", "vision_model.post_layernorm."),
                     "projection": ("language_projection.",),
                     "vision": ("vision_model.",), "language": ("language_model.",)}
    # LAVIS trains the Q-Former and the projection with OPT frozen (and the ViT too, freeze_vit: False: add
    # --train-modules qformer,projection,vision). Its 1,000 warm-up steps are 9% of its 5 COCO epochs
    # (566,747 captions / batch 256 = 2,214 steps per epoch, 11,070 in all): kept as that fraction. OPT's own loss,
    # no label smoothing.
    recipe = dict(lr=1e-5, lr_schedule="cosine", warmup_ratio=0.09, weight_decay=0.05, label_smoothing=0.0,
                  prompt="a photo of", num_beams=5, max_new_tokens=30, min_new_tokens=8,
                  train_modules="qformer,projection")
    recipe_source = "LAVIS lavis/projects/blip2/train/caption_coco_ft.yaml"
    recipe_sources = {"label_smoothing": "LAVIS lavis/models/blip2_models/modeling_opt.py (CrossEntropyLoss, "
                                         "no smoothing)",
                      "train_modules": "LAVIS lavis/models/blip2_models/blip2_opt.py (OPT frozen; freeze_vit: False "
                                       "in the yaml: add vision)"}

    @classmethod
    def recipe_for(cls, config):
        """LAVIS fine-tunes the ViT-g that BLIP-2 pretrained at 224 px (patches of 14) at 364 px, its position
        embeddings interpolated to the larger grid (Family.resize_images); other vision encoders keep their size."""
        recipe = super().recipe_for(config)
        vision = config.vision_config
        if (vision.image_size, vision.patch_size, vision.hidden_size) == (224, 14, 1408):
            recipe["image_size"] = (364, cls.recipe_source)
        return recipe

    @classmethod
    def load_model(cls, checkpoint):
        """fp32 weights, as every family's (blip2-opt-2.7b: 15.6 GB; --precision bf16-weights then casts all but the
        Q-Former and query tokens to bf16: about 8 GB); on a GPU with BLIP2_8BIT=1 the language model in 8 bits if
        bitsandbytes is installed (untested here)."""
        options = eight_bit_options() if C.BLIP2_8BIT and torch.cuda.is_available() else {}
        return load_weights(Blip2ForConditionalGeneration, checkpoint, "BLIP-2 captioning model", **options)

    @classmethod
    def load_processor(cls, checkpoint):
        return load_pretrained(Blip2Processor, checkpoint, "BLIP-2 processor")

    def start_ids(self):
        return [self.config.text_config.bos_token_id]

    @property
    def end_id(self):
        return self.config.text_config.eos_token_id

    @property
    def pad_id(self):
        pad = self.config.text_config.pad_token_id
        return pad if pad is not None else self.tokenizer.pad_token_id

    def training_sequences(self, captions, max_tokens, prefix=None):
        # after a prompt, a caption's first word is a word inside the text (" a", BPE's "Ġa"), as generated there
        return super().training_sequences([" " + c.strip() if self.prompt else c for c in captions], max_tokens,
                                          prefix)

    @property
    def never_generated(self):
        """Token ids generation must not choose: the <image> placeholder (a caption never holds one)."""
        image_token = getattr(self.config, "image_token_index", None)
        return [image_token] if image_token is not None else []

    def training_text(self, caption):
        return caption

    def tidy(self, text):
        return " ".join(text.split())

    # ---- the model

    def encode_images(self, model, pixel_values):
        """The projected Q-Former outputs [images, query tokens, language model width], as transformers computes
        them in generate()."""
        blip2 = core_model(model)
        image_embeds = blip2.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state
        queries = blip2.qformer(
            query_embeds=blip2.query_tokens.expand(image_embeds.shape[0], -1, -1), encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device),
            return_dict=True).last_hidden_state
        return blip2.language_projection(queries.to(blip2.language_projection.weight.dtype))

    def _inputs(self, model, image_features, input_ids, attention_mask):
        """[queries ; text] embeddings and attention mask for the language model."""
        language_model = core_model(model).language_model
        # a copy: with LoRA and activation checkpointing transformers may hand back a leaf that requires grad
        text = language_model.get_input_embeddings()(input_ids).clone()
        embeds = torch.cat([image_features.to(text.dtype), text], dim=1)
        mask = torch.cat([attention_mask.new_ones(image_features.shape[:2]), attention_mask], dim=1)
        return embeds, mask

    def token_logits(self, model, image_features, input_ids, attention_mask):
        embeds, mask = self._inputs(model, image_features, input_ids, attention_mask)
        logits = core_model(model).language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
        return logits[:, image_features.shape[1]:].float()

    @torch.no_grad()
    def generate(self, model, pixel_values, num_beams=3, max_new_tokens=30, min_new_tokens=0, starts=None, **decoding):
        """The language model's generate() from [queries ; prefix], as Blip2ForConditionalGeneration.generate() runs
        it, with the images encoded here (no <image> placeholders needed: older checkpoints' configs have none)."""
        features = self.encode_images(model, pixel_values)
        start = self.first_tokens(features.shape[0], features.device, starts)
        embeds, mask = self._inputs(model, features, start, torch.ones_like(start))
        new = core_model(model).language_model.generate(
            inputs_embeds=embeds, attention_mask=mask, num_beams=num_beams, max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens, do_sample=False, eos_token_id=self.end_id, pad_token_id=self.pad_id,
            bos_token_id=self.start_ids()[0], suppress_tokens=self.never_generated or None, **decoding)
        # from inputs_embeds alone, generate() returns only the new tokens (num_return_sequences rows per image)
        return torch.cat([start.repeat_interleave(new.shape[0] // start.shape[0], dim=0), new], dim=1)

    @torch.no_grad()
    def sample(self, model, image_features, samples_per_image, max_new_tokens, greedy=False, temperature=1.0,
               starts=None):
        """Token by token with a key/value cache over [queries ; prefix]; rows that have ended are padded."""
        language_model = core_model(model).language_model
        features = image_features.repeat_interleave(samples_per_image, dim=0)
        cache, mask = DynamicCache(), None

        def next_logits(tokens, first):
            nonlocal mask
            if first:  # the query tokens and the prefix
                embeds, mask = self._inputs(model, features, tokens, torch.ones_like(tokens))
            else:
                embeds = language_model.get_input_embeddings()(tokens)
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            logits = language_model(inputs_embeds=embeds, attention_mask=mask, cache=cache,
                                    use_cache=True).logits[:, -1].float()
            logits[:, self.never_generated] = float("-inf")
            return logits

        return self.draw_tokens(features.shape[0], max_new_tokens, next_logits, greedy, temperature, features.device,
                                starts)


def eight_bit_options():
    """from_pretrained options for the language model in 8 bits (bitsandbytes; the ViT, Q-Former and projection
    stay in bf16/fp32). Optional: bitsandbytes is not one of this project's dependencies."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("BLIP2_8BIT=1 needs bitsandbytes (pip install bitsandbytes), which is not installed")
    from transformers import BitsAndBytesConfig
    return {"quantization_config": BitsAndBytesConfig(
        load_in_8bit=True, llm_int8_skip_modules=["vision_model", "qformer", "language_projection", "lm_head"]),
        "device_map": {"": torch.cuda.current_device()}}

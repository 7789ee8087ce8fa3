"""GIT (microsoft/git-base, git-large, git-large-coco, git-large-textcaps): a CLIP image encoder whose projected
patch features are prepended to the caption's tokens, and one BERT-style transformer over both (image tokens
attend to each other, caption tokens causally to the image and the caption so far). Tokenizer: bert-base-uncased.

GitForCausalLM only takes pixel values, which would encode an image once per caption; so the text side is run
here from its parts (embeddings, encoder, output head) on features encoded once per image, as GitModel.forward
does (tests/test_git.py checks the loss against GitForCausalLM's own).
"""
import torch
from transformers import GitForCausalLM, GitProcessor
from transformers.cache_utils import DynamicCache

from ..helpers import UserError
from ..modeling import core_model, load_pretrained, load_weights
from .base import Family


class Git(Family):
    name = "GIT"
    model_types = ("git",)
    lora_targets = ("query", "value")   # the text transformer's self-attention (the CLIP encoder's are q_proj/v_proj)
    checkpoints = ("microsoft/git-base", "microsoft/git-large-textcaps")
    module_groups = {"vision": ("git.image_encoder.",), "projection": ("git.visual_projection.",),
                     "text": ("git.embeddings.", "git.encoder.", "output.")}
    # The authors' captioner (generativeimage2text/model.py): label-smoothed cross-entropy, beam 4, length penalty 0.6
    # (theirs is GNMT's ((5 + length) / 6) ** 0.6; transformers' generate() divides by length ** 0.6). Their
    # repository publishes no fine-tuning learning rate or schedule: those stay this project's.
    recipe = dict(label_smoothing=0.1, num_beams=4, length_penalty=0.6, prompt="")
    recipe_source = "microsoft/GenerativeImage2Text generativeimage2text/model.py"
    recipe_sources = {"label_smoothing": "microsoft/GenerativeImage2Text generativeimage2text/layers/decoder.py "
                                         "(SmoothLabelCrossEntropyLoss, eps=0.1)"}

    @classmethod
    def resize_images(cls, model, size):
        """GIT's text layers count the image tokens of its configured size (image_patch_tokens): it keeps that size."""
        own = core_model(model).config.vision_config.image_size
        if size is not None and size != own:
            raise UserError(f"--image-size {size}: GIT trains and captions at its checkpoint's {own} px only (its text "
                            f"layers count the image tokens of that size)")
        return model

    def use_image_size(self, model, size):
        self.resize_images(model, size)  # its processor already resizes and crops to that size

    @classmethod
    def load_model(cls, checkpoint):
        return load_weights(GitForCausalLM, checkpoint, "GIT captioning model")

    @classmethod
    def load_processor(cls, checkpoint):
        return load_pretrained(GitProcessor, checkpoint, "GIT processor")

    # GIT was trained on "[CLS] caption [SEP]" (its processor's text encoding; config bos/eos are the same ids in
    # the microsoft checkpoints). generate() and sample() below start from `prefix` and stop at end_id explicitly.
    def start_ids(self):
        return [self.tokenizer.cls_token_id]

    @property
    def end_id(self):
        return self.tokenizer.sep_token_id

    @property
    def pad_id(self):
        return self.tokenizer.pad_token_id

    def encode_images(self, model, pixel_values):
        git = core_model(model).git
        return git.visual_projection(git.image_encoder(pixel_values).last_hidden_state)

    def _hidden_states(self, model, image_features, input_ids, attention_mask, cache=None):
        """The transformer's output at the positions of `input_ids`. Without `cache` the sequence is the image tokens
        then `input_ids`; with one, `input_ids` follow what the cache holds (attending to all of it)."""
        git = core_model(model).git
        past = cache.get_seq_length() if cache is not None else 0
        # The word embeddings go in as a copy: with LoRA and activation checkpointing, transformers marks their output
        # as requiring grad (a leaf tensor), to which GitEmbeddings would add the positions in place (an error).
        words = git.embeddings.word_embeddings(input_ids).clone()
        text = git.embeddings(inputs_embeds=words, cache_length=max(0, past - image_features.shape[1]))
        if past:
            return git.encoder(text, attention_mask=None, cache=cache, use_cache=True).last_hidden_state
        hidden = torch.cat([image_features.to(text.dtype), text], dim=1)
        mask = self._attention_mask(image_features.shape[1], attention_mask, hidden.dtype)
        return git.encoder(hidden, attention_mask=mask, cache=cache,
                           use_cache=cache is not None).last_hidden_state[:, image_features.shape[1]:]

    @staticmethod
    def _attention_mask(image_tokens, text_mask, dtype):
        """GitModel's additive mask [rows, 1, queries, keys]: image tokens see the image, text tokens see the image
        and the unpadded text up to themselves."""
        rows, text_tokens = text_mask.shape
        size = image_tokens + text_tokens
        causal = torch.ones(size, size, dtype=torch.bool, device=text_mask.device).tril()
        causal[:image_tokens, :image_tokens] = True
        keys = torch.cat([text_mask.new_ones(rows, image_tokens), text_mask], dim=1).bool()
        allowed = causal[None] & keys[:, None, :]
        return torch.zeros(allowed.shape, dtype=dtype, device=text_mask.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)[:, None]

    def token_logits(self, model, image_features, input_ids, attention_mask):
        return core_model(model).output(self._hidden_states(model, image_features, input_ids, attention_mask))

    @torch.no_grad()
    def generate(self, model, pixel_values, num_beams=3, max_new_tokens=30, min_new_tokens=0, starts=None, **decoding):
        start = self.first_tokens(pixel_values.shape[0], pixel_values.device, starts)
        return core_model(model).generate(
            pixel_values=pixel_values, input_ids=start, attention_mask=torch.ones_like(start), num_beams=num_beams,
            max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False,
            eos_token_id=self.end_id, pad_token_id=self.pad_id, **decoding)

    @torch.no_grad()
    def sample(self, model, image_features, samples_per_image, max_new_tokens, greedy=False, temperature=1.0,
               starts=None):
        """Token by token with a key/value cache over the once-encoded image (transformers' generate() would encode
        it again per sample); rows that have ended are padded."""
        features = image_features.repeat_interleave(samples_per_image, dim=0)
        cache = DynamicCache()

        def next_logits(tokens, first):
            return core_model(model).output(
                self._hidden_states(model, features, tokens, torch.ones_like(tokens), cache)[:, -1])

        return self.draw_tokens(features.shape[0], max_new_tokens, next_logits, greedy, temperature, features.device,
                                starts)

"""The one interface through which the engine, the objectives and the entry points use a captioner.

A family (BLIP, GIT, BLIP-2) says how its checkpoints load, which tokens start and end a caption,
how images are encoded, how token logits are computed from encoded images, how captions are
generated and sampled, and how generated tokens become caption text. Everything built from those
pieces (the training loss, SCST's log-probabilities, batches) is written once, here and in the engine.

Token sequences are laid out the same way in every family:
    [start tokens] [prompt tokens] [caption tokens] [end token] [padding]
`prefix` is the start and prompt tokens: generation begins with them, training does not score them,
and `decode` drops them, so a prompt never reaches a written or scored caption. With --ocr each image has a prefix
of its own, its OCR words between the start and prompt tokens (`prefix_ids`); `generate_from` and `sample_from`
start each image from its own, and `decode` and `sequence_log_probs` then take each row's prefix length.
"""
import torch
import torch.nn.functional as F

from ..helpers import UserError
from ..modeling import core_model
from ..text import tidy_caption, training_caption


class Family:
    name = ""                 # shown in logs
    model_types = ()          # config.json `model_type` values of this family's checkpoints
    lora_targets = ()         # default LoRA target modules (src.peft; --lora-targets overrides)
    full_fine_tuning = True   # False: src.ft refuses --train-modules all (too large to train every weight)
    checkpoints = ()          # its usual hub checkpoints: what `scripts/get_data.py --checkpoints all` fetches
    # Parts of the model --train-modules can name: {group: parameter-name prefixes of the transformers model}.
    # src.ft trains the recipe's `train_modules` ("all": every weight); the rest stays frozen.
    module_groups = {}

    # The fine-tuning recipe: the RunConfig settings a run takes when no flag, environment variable or constant in
    # src/base/constants.py sets them (config.apply_recipe). A family lists the values its authors fine-tune
    # captioning with, and where they come from (`recipe_source`, or `recipe_sources` for one setting); the settings
    # it does not list are this project's own, here. `lora_lr` and `lora_train_modules` are src.peft's rate and extra
    # modules (the authors train no LoRA); docs/families.md has the table. Settings that depend on the checkpoint
    # (BLIP-large's rate, BLIP-2's image size) are added by the family's `recipe_for`.
    recipe = dict(lr=2e-5, lora_lr=2e-4, lr_schedule="cosine", warmup_ratio=0.05, weight_decay=0.05,
                  label_smoothing=0.1, prompt="", num_beams=3, max_new_tokens=30, min_new_tokens=5,
                  length_penalty=1.0, train_modules="all", lora_train_modules="none")
    recipe_source = "this project (src/base/families/base.py)"
    recipe_sources = {}

    @classmethod
    def recipe_for(cls, config):
        """{setting: (value, source)} for a checkpoint with model configuration `config`: this project's defaults,
        the image size the checkpoint was made for, then the family's own recipe over them."""
        recipe = {key: (value, Family.recipe_source) for key, value in Family.recipe.items()}
        recipe["image_size"] = (config.vision_config.image_size, "the checkpoint's own configuration")
        recipe.update({key: (value, cls.recipe_sources.get(key, cls.recipe_source))
                       for key, value in cls.recipe.items()})
        return recipe

    def __init__(self, config, processor, prompt=""):
        """`config` is the checkpoint's model configuration, `processor` its processor, `prompt` the text every
        caption starts from (--prompt; "" for none)."""
        self.config, self.processor, self.tokenizer = config, processor, processor.tokenizer
        self.prompt = prompt.strip()
        self.prefix = self.start_ids() + (self.word_ids([self.prompt])[0] if self.prompt else [])

    @classmethod
    def module_prefixes(cls, names):
        """Parameter-name prefixes of the --train-modules groups `names` (comma-separated)."""
        chosen = [name.strip() for name in names.split(",") if name.strip()]
        unknown = [name for name in chosen if name not in cls.module_groups]
        if unknown or not chosen:
            raise UserError(f"--train-modules {names}: {cls.name} has no part named {', '.join(unknown) or 'so'} "
                            f"(its parts: {', '.join(cls.module_groups)}, or all)")
        return tuple(prefix for name in chosen for prefix in cls.module_groups[name])

    # ---- image size (--image-size)

    @classmethod
    def vision_embeddings(cls, model):
        """The module that holds the vision encoder's patch grid and position embeddings (BLIP's and BLIP-2's)."""
        return core_model(model).vision_model.embeddings

    @classmethod
    def resize_images(cls, model, size):
        """`model` made to see images of `size` pixels square (None: as it is): its vision position embeddings
        interpolated (bicubic) to the new patch grid, the class position kept, and its configuration saying so, as
        LAVIS does once when it fine-tunes BLIP-2's 224-px ViT at 364 (interpolate_pos_embed). Returns `model`."""
        embeddings = cls.vision_embeddings(model)
        if size is None or size == embeddings.image_size:
            return model
        patch = embeddings.patch_size
        if size % patch:
            raise UserError(f"--image-size {size}: must be a multiple of {cls.name}'s patch size, {patch} pixels")
        table = embeddings.position_embedding.detach()  # (1, 1 + grid * grid, width)
        old_grid, new_grid, width = embeddings.image_size // patch, size // patch, table.shape[-1]
        grid = table[:, 1:].float().reshape(1, old_grid, old_grid, width).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, width).to(table.dtype)
        trains = embeddings.position_embedding.requires_grad
        embeddings.position_embedding = torch.nn.Parameter(torch.cat([table[:, :1], grid], dim=1), requires_grad=trains)
        embeddings.image_size, embeddings.num_patches = size, new_grid * new_grid
        embeddings.num_positions = embeddings.num_patches + 1
        core_model(model).config.vision_config.image_size = size  # saved with the model: it loads at this size
        return model

    def use_image_size(self, model, size):
        """Train or caption at `size` pixels: the model (resize_images) and the processor that feeds it."""
        self.resize_images(model, size)
        if size is not None:
            self.processor.image_processor.size = {"height": size, "width": size}

    # ---- loading (no instance needed)

    @classmethod
    def load_model(cls, checkpoint):
        """The captioning model of `checkpoint` (hub name or local directory), ready to train or caption."""
        raise NotImplementedError

    @classmethod
    def load_processor(cls, checkpoint):
        """The processor (image processor + tokenizer) saved with `checkpoint`."""
        raise NotImplementedError

    # ---- tokens

    def start_ids(self):
        """The token(s) every sequence starts with: what generate() starts from."""
        raise NotImplementedError

    @property
    def end_id(self):
        """The token that ends a caption: where generate() stops."""
        raise NotImplementedError

    @property
    def pad_id(self):
        raise NotImplementedError

    def word_ids(self, texts):
        """Token ids of each text, without special tokens."""
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []

    def prefix_ids(self, ocr_words, max_tokens):
        """An image's prefix under --ocr: the start tokens, its OCR words (whole words, at most `max_tokens` tokens in
        all), the prompt. An image without text has the family's `prefix`."""
        ocr = []
        for ids in self.word_ids([" " + word for word in ocr_words]):  # " ": a word inside text, for BPE tokenizers
            if len(ocr) + len(ids) > max_tokens:
                break
            ocr += ids
        start = len(self.start_ids())
        return self.prefix[:start] + ocr + self.prefix[start:]

    def training_sequences(self, captions, max_tokens, prefix=None):
        """Token ids of each caption as the model is trained on it: prefix (`prefix`, an image's own, or the
        family's), words, end token; at most `max_tokens` besides an image's OCR words (longer captions lose words,
        never the end token)."""
        room = max(1, max_tokens - len(self.prefix) - 1)
        words = self.word_ids([self.training_text(c) for c in captions])
        return [(prefix or self.prefix) + ids[:room] + [self.end_id] for ids in words]

    def training_text(self, caption):
        """The text a reference caption is trained as: what tidy could not tell apart once tokenised is written
        apart, with the same PTB tokens (see text.py). Families whose tokenizer round-trips text override this."""
        return training_caption(caption)

    def decode(self, sequences, prefix_lengths=None):
        """Caption text of each generated or sampled sequence (prefix included): the prefix (the first
        `prefix_lengths[row]` tokens where rows have their own) and everything from the end token on are dropped,
        and the text is written the way reference captions are (see text.py).
        Validation, test and the SCST reward all read captions through this one function."""
        captions = []
        for words in self._after_prefix(sequences, prefix_lengths):
            if self.end_id in words:
                words = words[: words.index(self.end_id)]
            # pinned off: tokenizers saved by transformers 4.x turn it on, merging "says ' open ' on" to "says'open'on"
            text = self.tokenizer.decode(words, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            captions.append(self.tidy(text))
        return captions

    def tidy(self, text):
        """Undo the tokenizer's splitting of punctuation (families whose tokenizer round-trips text override this)."""
        return tidy_caption(text)

    # ---- the model

    def encode_images(self, model, pixel_values):
        """Image features the text side attends to, one row per image (with gradients when training)."""
        raise NotImplementedError

    def token_logits(self, model, image_features, input_ids, attention_mask):
        """Next-token logits at every position of `input_ids` [rows, tokens, vocabulary]; `image_features` has
        one row per sequence."""
        raise NotImplementedError

    @torch.no_grad()
    def generate(self, model, pixel_values, num_beams=3, max_new_tokens=30, min_new_tokens=0, starts=None, **decoding):
        """Token ids of one caption per image (beam search or greedy), each row starting with `prefix` (or its image's
        row of `starts`: first_tokens). Extra `decoding` settings (length_penalty, repetition_penalty,
        num_return_sequences, ...) go to transformers' generate()."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, model, image_features, samples_per_image, max_new_tokens, greedy=False, temperature=1.0,
               starts=None):
        """`samples_per_image` captions per image drawn from softmax(logits / temperature) with no other
        truncation (or greedy), rows grouped by image, each starting with `prefix` (or its image's row of `starts`).
        `image_features` come from encode_images."""
        raise NotImplementedError

    def first_tokens(self, rows, device=None, starts=None):
        """The tokens every generated row starts from [rows, prefix tokens]: the family's `prefix`, or each image's
        own (`starts`: one prefix per image, all of one length; generate_from and sample_from pass them), repeated for
        the rows of each image."""
        if starts is None:
            return torch.tensor([self.prefix], device=device).expand(rows, -1)
        starts = torch.tensor(starts, device=device)
        return starts.repeat_interleave(rows // starts.shape[0], dim=0)

    def generate_from(self, model, pixel_values, prefixes=None, **settings):
        """generate() with each image starting from its own prefix (`prefixes`, --ocr; None: the family's).
        Returns (sequences, each row's prefix length, or None without `prefixes`)."""
        if prefixes is None:
            return self.generate(model, pixel_values, **settings), None
        return self._by_prefix_length(prefixes, lambda images, starts: self.generate(
            model, pixel_values[images], starts=starts, **settings))

    def sample_from(self, model, image_features, prefixes, samples_per_image, max_new_tokens, **settings):
        """sample() with each image starting from its own prefix (`prefixes`, --ocr; None: the family's).
        Returns (sequences, each row's prefix length, or None without `prefixes`)."""
        if prefixes is None:
            return self.sample(model, image_features, samples_per_image, max_new_tokens, **settings), None
        return self._by_prefix_length(prefixes, lambda images, starts: self.sample(
            model, image_features[images], samples_per_image, max_new_tokens, starts=starts, **settings))

    def _by_prefix_length(self, prefixes, run):
        """`run(image indices, their prefixes)` once per prefix length, for the images whose prefixes have that length:
        no prefix is padded, so a row is generated exactly as it would be alone (left padding would shift the
        positions of GIT's and BLIP's absolute position embeddings). Rows are put back in image order (an image's rows
        together), right-padded with pad_id; returns them with each row's prefix length."""
        groups = {}
        for image, prefix in enumerate(prefixes):
            groups.setdefault(len(prefix), []).append(image)
        rows_of, width = {}, 0
        for images in groups.values():
            sequences = run(torch.tensor(images), [prefixes[i] for i in images])
            per_image = sequences.shape[0] // len(images)
            for k, image in enumerate(images):
                rows_of[image] = sequences[k * per_image: (k + 1) * per_image]
            width = max(width, sequences.shape[1])
        rows = [rows_of[i] for i in range(len(prefixes))]
        sequences = torch.full((sum(r.shape[0] for r in rows), width), self.pad_id, dtype=rows[0].dtype,
                               device=rows[0].device)
        lengths, start = [], 0
        for image, r in enumerate(rows):
            sequences[start: start + r.shape[0], : r.shape[1]] = r
            lengths += [len(prefixes[image])] * r.shape[0]
            start += r.shape[0]
        return sequences, torch.tensor(lengths, device=sequences.device)

    def draw_tokens(self, rows, max_new_tokens, next_logits, greedy=False, temperature=1.0, device=None, starts=None):
        """The token-by-token loop that families with their own cached decoding share (GIT, BLIP-2): `rows`
        sequences start with `prefix` (or `starts`: first_tokens); `next_logits(tokens, first)` feeds `tokens` (the
        prefix first, then each drawn token) and returns the logits of the last position. Greedy, or sampled from
        softmax(logits / temperature); rows that have ended are padded."""
        sequences = self.first_tokens(rows, device, starts)
        step, ended = sequences, torch.zeros(rows, dtype=torch.bool, device=device)
        for i in range(max_new_tokens):
            logits = next_logits(step, i == 0).float()
            if greedy:
                token = logits.argmax(-1)
            else:
                token = torch.multinomial(torch.softmax(logits / temperature, -1), 1).squeeze(1)
            token = token.masked_fill(ended, self.pad_id)
            sequences = torch.cat([sequences, token[:, None]], dim=1)
            ended |= token == self.end_id
            if ended.all():
                break
            step = token[:, None]
        return sequences

    def legacy_weights(self, model):
        """Weights to save beside the model's own so that older transformers (4.x) load it right: {name: tensor}."""
        return {}

    # ---- built from the pieces above, the same for every family

    def loss(self, model, batch, label_smoothing=0.0):
        """Mean cross-entropy over the batch's scored caption tokens (labels -100 elsewhere), encoding each image
        once: its features are repeated for its captions, which gives the same gradient as encoding it per caption."""
        features = self.encode_images(model, batch["pixel_values"])
        # output_size: the row count is known without reading the counts, so torch.compile traces one graph
        features = features.repeat_interleave(batch["captions_per_image"].to(features.device), dim=0,
                                              output_size=batch["input_ids"].shape[0])
        logits = self.token_logits(model, features, batch["input_ids"], batch["attention_mask"])
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                               ignore_index=-100, label_smoothing=label_smoothing)

    def cut_short(self, sequences, prefix_lengths=None):
        """For each generated row, whether it has no end token after its prefix: generation stopped at
        max_new_tokens in mid-caption."""
        return [self.end_id not in tokens for tokens in self._after_prefix(sequences, prefix_lengths)]

    def _after_prefix(self, sequences, prefix_lengths=None):
        """The token ids of each row after its prefix (the family's, or the first `prefix_lengths[row]`)."""
        rows = sequences.tolist() if torch.is_tensor(sequences) else sequences
        return [row[len(self.prefix) if prefix_lengths is None else int(prefix_lengths[i]):]
                for i, row in enumerate(rows)]

    def generated_mask(self, sequences, prefix_lengths=None, max_new_tokens=None):
        """Which tokens of sampled sequences the model chose: after the prefix (each row's own: `prefix_lengths`),
        up to and including the first end token, at most `max_new_tokens` (rows of sample_from are right-padded
        past that when they never ended). Returns a bool tensor shaped like `sequences[:, 1:]` (the positions that
        are predicted)."""
        targets = sequences[:, 1:]
        positions = torch.arange(1, sequences.shape[1], device=sequences.device)
        if prefix_lengths is None:
            generated = positions >= len(self.prefix)
        else:
            starts = prefix_lengths.to(sequences.device)[:, None]
            generated = (positions >= starts) & (max_new_tokens is None or positions < starts + max_new_tokens)
        is_end = (targets == self.end_id) & generated
        return generated & ((is_end.long().cumsum(dim=1) - is_end.long()) == 0)

    def sequence_log_probs(self, model, image_features, sequences, temperature=1.0, prefix_lengths=None,
                           max_new_tokens=None):
        """(log-probability of each sampled caption's generated tokens under softmax(logits / temperature), with
        gradients; how many tokens that is). `prefix_lengths`, `max_new_tokens`: as sample_from gave them."""
        counted = self.generated_mask(sequences, prefix_lengths, max_new_tokens)
        attention_mask = torch.cat([torch.ones_like(sequences[:, :1]), counted.long()], dim=1)
        if prefix_lengths is None:
            attention_mask[:, : len(self.prefix)] = 1
        else:
            positions = torch.arange(sequences.shape[1], device=sequences.device)
            attention_mask |= (positions < prefix_lengths.to(sequences.device)[:, None]).long()
        logits = self.token_logits(model, image_features, sequences, attention_mask)[:, :-1]
        token_log_probs = torch.log_softmax(logits.float() / temperature, dim=-1).gather(2, sequences[:, 1:, None]).squeeze(2)
        return (token_log_probs * counted).sum(dim=1), counted.sum(dim=1)

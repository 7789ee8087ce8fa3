"""Make the offline demo: a synthetic VizWiz-format data set and tiny BLIP, GIT and BLIP-2 checkpoints.

    python scripts/make_demo_assets.py                # -> data/demo/{vizwiz,coco-style,tiny-blip,tiny-git,tiny-blip2}
    python scripts/make_demo_assets.py --out /tmp/d --train 200 --val 40 --test 30

The images are phone-photo-like JPEGs (random sizes and aspect ratios, noise, some stored
sideways with an EXIF rotation) of one coloured shape on a coloured background; each has five
captions naming the shape, its colour and the background colour in varied phrasings, so a
model can only score well by reading the pixels. Like the real data set, some captions are
rejected, some images carry the precanned "quality issues" caption, and a few images have no
usable caption at all. The tiny BLIP, GIT and BLIP-2 (0.3-0.4M parameters, 32x32 input) have the real
architectures, processor and tokenizer files, saved with save_pretrained.
"""
import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.base import constants as C  # noqa: E402
from src.base.cli import ArgumentParser  # noqa: E402

PRECANNED = "Quality issues are too severe to recognize visual content."
COLORS = {
    "red": (200, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 200), "yellow": (230, 210, 40),
    "white": (240, 240, 240), "black": (20, 20, 20), "purple": (130, 40, 160), "orange": (240, 130, 20),
}
BACKGROUNDS = ["white", "black", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle", "cross"]
TEMPLATES = [
    "a {c} {s} on a {b} background.",
    "A {c} {s} in front of a {b} wall",
    "there is a {c} {s} on a {b} surface",
    "a picture of a {c} {s} against {b}.",
    "The image shows a {c} {s} on {b}",
    "someone's {c} {s} lying on a {b} table",
    "a close-up of a {c} {s} with a {b} background",
]
# Captions in another style, as in a generic (COCO-like) captioning corpus: the demo first trains the
# tiny model on these to stand in for a pretrained captioner, then adapts it to the VizWiz-style set.
PRETRAIN_TEMPLATES = [
    "{c} {s} over {b}",
    "photo of one {c} {s} , {b} backdrop",
    "an image with a {c} {s} and {b} behind it",
]
REJECTED = ["idk", "blah blah", "a picture"]


def draw_image(rng, color, shape, background):
    width = rng.randint(120, 260)
    height = int(width * rng.choice([0.75, 1.0, 4 / 3]))
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 12, (height, width, 3))
    pixels = np.clip(np.array(COLORS[background], dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    size = rng.uniform(0.45, 0.7) * min(width, height)
    x0 = rng.uniform(0, width - size)
    y0 = rng.uniform(0, height - size)
    box = [x0, y0, x0 + size, y0 + size]
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0 + size / 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=fill)
    else:
        third = size / 3
        draw.rectangle([x0 + third, y0, x0 + 2 * third, y0 + size], fill=fill)
        draw.rectangle([x0, y0 + third, x0 + size, y0 + 2 * third], fill=fill)
    return image


def save_photo(image, path, rng):
    """Save as JPEG; one image in eight stored sideways with the EXIF tag that turns it upright."""
    if rng.random() < 0.125:
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 CW to display": store the pixels rotated 90 CCW
        image.transpose(Image.Transpose.ROTATE_90).save(path, quality=rng.randint(80, 95), exif=exif)
    else:
        image.save(path, quality=rng.randint(80, 95))


def make_split(root, split, count, first_id, rng, with_captions, templates=TEMPLATES):
    (root / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for n in range(count):
        image_id = first_id + n
        file_name = f"VizWiz_{split}_{n:08d}.jpg"
        color = rng.choice(list(COLORS))
        background = rng.choice([b for b in BACKGROUNDS if b != color])
        shape = rng.choice(SHAPES)
        unusable = templates is TEMPLATES and rng.random() < 0.04  # too dark / blurred: every caption precanned
        image = draw_image(rng, color, shape, background)
        if unusable:
            image = Image.new("RGB", image.size, (5, 5, 5))
        save_photo(image, root / split / file_name, rng)
        images.append({"file_name": file_name, "vizwiz_url": "", "id": image_id, "text_detected": False})
        if not with_captions:
            continue
        for template in rng.sample(templates, min(5, len(templates))):
            caption, rejected, precanned = template.format(c=color, s=shape, b=background), False, False
            if templates is not TEMPLATES:
                pass  # the clean "pretraining" corpus has no rejected or precanned captions
            elif unusable or rng.random() < 0.03:
                caption, precanned = PRECANNED, True
            elif rng.random() < 0.05:
                caption, rejected = rng.choice(REJECTED), True
            annotations.append({"caption": caption, "image_id": image_id, "is_precanned": precanned,
                                "is_rejected": rejected, "id": len(annotations), "text_detected": False})
    content = {"info": {"description": f"synthetic VizWiz-format demo, {split}"}, "images": images}
    if with_captions:
        content["annotations"] = annotations
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    with open(root / "annotations" / f"{split}.json", "w") as f:
        json.dump(content, f)


def make_dataset(root, train=400, val=60, test=40, seed=0, templates=TEMPLATES):
    root = Path(root)
    rng = random.Random(seed)
    make_split(root, "train", train, 1, rng, True, templates)
    make_split(root, "val", val, 100_001, rng, True, templates)
    make_split(root, "test", test, 200_001, rng, False, templates)
    return root


def vocabulary(texts=None):
    """Every word of `texts` (default: the demo's templates and words) as BERT's basic tokenizer splits it
    ("someone's" -> someone ' s, "close-up" -> close - up), so that a BERT tokenizer over this vocabulary
    splits captions exactly as bert-base-uncased does."""
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    if texts is None:
        texts = [t.format(c="", s="", b="") for t in TEMPLATES + PRETRAIN_TEMPLATES] + REJECTED + [PRECANNED]
        texts += list(COLORS) + SHAPES
    normalize, split = BertNormalizer(lowercase=True), BertPreTokenizer()
    return sorted({word for text in texts for word, _ in split.pre_tokenize_str(normalize.normalize_str(text))})


def make_tiny_blip(out_dir, image_size=32, seed=0, texts=None):
    """A randomly initialised BLIP captioner with the real architecture, at toy size, saved like a hub checkpoint;
    its vocabulary holds the words of `texts` (default: the demo's)."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = specials + vocabulary(texts) + ["[DEC]"]
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(vocab)}, do_lower_case=True, bos_token="[DEC]")
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)

    hidden = 64
    config = BlipConfig(
        vision_config=dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2,
                           num_attention_heads=4, image_size=image_size, patch_size=8,
                           initializer_range=0.02),  # the library default, 1e-10, starts with a blind encoder
        text_config=dict(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, encoder_hidden_size=hidden,
                         max_position_embeddings=64, pad_token_id=vocab.index("[PAD]"),
                         bos_token_id=vocab.index("[DEC]"), sep_token_id=vocab.index("[SEP]"),
                         eos_token_id=vocab.index("[SEP]")),
    )
    torch.manual_seed(seed)
    BlipForConditionalGeneration(config).save_pretrained(out_dir)
    return out_dir


def make_tiny_git(out_dir, image_size=32, seed=0, texts=None):
    """A randomly initialised GIT captioner (microsoft/git-*'s architecture and processor) at toy size, saved like a
    hub checkpoint. Its tokenizer is a BERT tokenizer over the words of `texts` (default: the demo's), with [CLS] and
    [SEP] starting and ending captions as bert-base-uncased's do in the real checkpoints."""
    import torch
    from transformers import BertTokenizer, CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + vocabulary(texts)
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(vocab)}, do_lower_case=True)
    # as the real checkpoints' processor: shorter side to image_size, then the centre square
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    GitProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)

    hidden = 64
    config = GitConfig(
        vision_config=dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2,
                           num_attention_heads=4, image_size=image_size, patch_size=8),
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
    )
    torch.manual_seed(seed)
    GitForCausalLM(config).save_pretrained(out_dir)
    return out_dir


def opt_style_tokenizer(texts, vocab_size=600):
    """A byte-level BPE tokenizer as OPT's (GPT-2 style) trained on `texts`, with OPT's special tokens at OPT's ids
    (<s> 0, <pad> 1, </s> 2, <unk> 3) and </s> prepended to every text, as OPT's tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bpe.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B",
                                                       special_tokens=[("</s>", 2)])  # OPT prepends </s>
    return GPT2TokenizerFast(tokenizer_object=bpe, bos_token="</s>", eos_token="</s>", unk_token="<unk>",
                             pad_token="<pad>", add_prefix_space=False)


def make_tiny_blip2(out_dir, image_size=32, seed=0, texts=None):
    """A randomly initialised BLIP-2 captioner (Salesforce/blip2-opt-*'s architecture: ViT, Q-Former, OPT) at toy
    size, saved like a hub checkpoint. Its tokenizer is byte-level BPE as OPT's (GPT-2 style, trained here on the
    demo's texts), with OPT's special tokens at OPT's ids (<s> 0, <pad> 1, </s> 2, <unk> 3): </s> starts a caption,
    and, as in blip2-opt-2.7b's config (eos_token_id 50118), the newline token ends it."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = texts or [t.format(c=c, s=s, b=b) for t in TEMPLATES + PRETRAIN_TEMPLATES for c in COLORS for s in SHAPES
                      for b in BACKGROUNDS]  # the words of `texts` (default: the demo's) shape its tokenizer
    texts = texts + REJECTED + [PRECANNED, "\n"]
    tokenizer = opt_style_tokenizer(texts)
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    num_query_tokens = 4
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=num_query_tokens)
    processor.save_pretrained(out_dir)  # the processor adds the <image> token to the tokenizer

    tokenizer = processor.tokenizer
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1, newline
    hidden = 64
    config = Blip2Config(
        vision_config=dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2,
                           num_attention_heads=4, image_size=image_size, patch_size=8),
        qformer_config=dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2,
                            num_attention_heads=4, encoder_hidden_size=hidden, cross_attention_frequency=1,
                            vocab_size=len(tokenizer)),
        text_config=dict(model_type="opt", vocab_size=len(tokenizer), hidden_size=hidden, ffn_dim=4 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=hidden,
                         max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id, bos_token_id=2,
                         eos_token_id=newline[0]),
        num_query_tokens=num_query_tokens, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    Blip2ForConditionalGeneration(config).save_pretrained(out_dir)
    return out_dir


def main():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=C.DEMO_DIR, help="writes <out>/vizwiz, <out>/tiny-blip, <out>/tiny-git and <out>/tiny-blip2 (default: DEMO_DIR)")
    parser.add_argument("--train", type=int, default=400, help="training images")
    parser.add_argument("--val", type=int, default=60, help="validation images")
    parser.add_argument("--test", type=int, default=40, help="test images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = make_dataset(Path(args.out) / "vizwiz", args.train, args.val, args.test, args.seed)
    pretrain = make_dataset(Path(args.out) / "coco-style", args.train, args.val, 0, args.seed + 1, PRETRAIN_TEMPLATES)
    blip = make_tiny_blip(Path(args.out) / "tiny-blip", seed=args.seed)
    git = make_tiny_git(Path(args.out) / "tiny-git", seed=args.seed)
    blip2 = make_tiny_blip2(Path(args.out) / "tiny-blip2", seed=args.seed)
    print(f"VizWiz-style data set: {data}\nCOCO-style pretraining set: {pretrain}\n"
          f"tiny BLIP (random weights): {blip}\ntiny GIT (random weights): {git}\n"
          f"tiny BLIP-2 (random weights): {blip2}")


if __name__ == "__main__":
    main()

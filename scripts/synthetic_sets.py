"""Two more synthetic VizWiz-format data sets, generated differently from the demo's (scripts/make_demo_assets.py):
other objects, colours, wordings, image sizes and seeds. A result that could depend on the data (SCST's gain, for
one) is checked on these as well as on the demo's set.

- "objects": household objects (mug, bottle, can, ...) drawn as simple silhouettes in muted colours on a scene
  colour (kitchen counter, bed sheet, ...), large portrait phone-sized photos, captions in VizWiz's own style
  ("a teal bottle of something on a kitchen counter", "someone's hand holding a brown mug").
- "layout": one bar or ring, small or large, in one of four places of a landscape page; captions say where
  ("a small navy ring in the top left corner of a beige page").
- "labels": a package (box, can, bottle) or a sign with a made-up brand word printed on it, sometimes over small
  print, on a shelf or table; a quarter have no label. The captions name the word ("a teal box of zorvik on a
  shelf"): a 32x32 tiny model cannot read it from the pixels, so only OCR (--ocr) can get it right.

    python -m scripts.synthetic_sets objects DIR [--train 240 --val 200 --test 10 --seed 7]
    python -m scripts.synthetic_sets labels DIR --tiny-blip MODEL_DIR   # and a tiny BLIP that knows its words
"""
import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.base.cli import ArgumentParser  # noqa: E402

PALETTE = {"pink": (235, 120, 170), "brown": (120, 70, 30), "grey": (128, 128, 128), "teal": (0, 128, 128),
           "navy": (20, 30, 110), "beige": (225, 210, 170), "maroon": (120, 20, 40), "lime": (160, 230, 40)}

OBJECTS = ["mug", "bottle", "can", "box", "jar", "book"]
SCENES = {"kitchen counter": "beige", "bed sheet": "pink", "wooden floor": "brown", "dark table": "navy"}
OBJECT_WORDINGS = [
    "a {c} {o} on a {s}",
    "someone's hand holding a {c} {o} above a {s}",
    "a {c} {o} of something sitting on a {s}",
    "close-up of a {c} {o} on top of a {s}",
    "the photo shows a {c} {o} , a {s} behind it",
]

PLACES = {"top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
          "bottom right": (0.75, 0.75)}
MARKS = ["bar", "ring"]
SIZES = {"small": 0.18, "large": 0.4}
LAYOUT_WORDINGS = [
    "a {z} {c} {m} in the {p} corner of a {b} page",
    "{z} {c} {m} , {p} of the {b} paper",
    "there's a {z} {c} {m} at the {p} of a {b} sheet",
    "a {b} page with a {c} {m} in its {p} corner",
]


def _noisy_background(rng, width, height, color):
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 10, (height, width, 3))
    return Image.fromarray(np.clip(np.array(color, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def _draw_object(draw, kind, box, fill):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if kind == "mug":
        draw.rectangle([x0, y0, x0 + 0.7 * w, y1], fill=fill)
        draw.ellipse([x0 + 0.55 * w, y0 + 0.25 * h, x1, y0 + 0.7 * h], outline=fill, width=max(2, int(w / 10)))
    elif kind == "bottle":
        draw.rectangle([x0 + 0.25 * w, y0 + 0.35 * h, x0 + 0.75 * w, y1], fill=fill)
        draw.rectangle([x0 + 0.4 * w, y0, x0 + 0.6 * w, y0 + 0.35 * h], fill=fill)
    elif kind == "can":
        draw.rectangle([x0 + 0.15 * w, y0 + 0.1 * h, x0 + 0.85 * w, y0 + 0.9 * h], fill=fill)
        draw.ellipse([x0 + 0.15 * w, y0, x0 + 0.85 * w, y0 + 0.2 * h], fill=(250, 250, 250))
    elif kind == "box":
        draw.rectangle(box, fill=fill)
        draw.line([x0, y0, x1, y1], fill=(250, 250, 250), width=max(2, int(w / 15)))
    elif kind == "jar":
        draw.rounded_rectangle([x0 + 0.1 * w, y0 + 0.2 * h, x0 + 0.9 * w, y1], radius=w / 4, fill=fill)
        draw.rectangle([x0 + 0.2 * w, y0, x0 + 0.8 * w, y0 + 0.2 * h], fill=(30, 30, 30))
    else:  # book
        draw.rectangle([x0, y0 + 0.15 * h, x1, y1 - 0.15 * h], fill=fill)
        draw.rectangle([x0, y0 + 0.15 * h, x0 + 0.12 * w, y1 - 0.15 * h], fill=(15, 15, 15))


def _objects_image(rng):
    obj, color, scene = rng.choice(OBJECTS), rng.choice(list(PALETTE)), rng.choice(list(SCENES))
    while color == SCENES[scene]:
        color = rng.choice(list(PALETTE))
    width = rng.randint(300, 480)
    height = int(width * rng.choice([4 / 3, 16 / 9]))  # portrait phone photos
    image = _noisy_background(rng, width, height, PALETTE[SCENES[scene]])
    size = rng.uniform(0.5, 0.8) * width
    x0, y0 = rng.uniform(0, width - size), rng.uniform(0, height - size)
    _draw_object(ImageDraw.Draw(image), obj, [x0, y0, x0 + size, y0 + size], PALETTE[color])
    return image, [w.format(c=color, o=obj, s=scene) for w in OBJECT_WORDINGS]


def _layout_image(rng):
    mark, color, place, size_word = rng.choice(MARKS), rng.choice(list(PALETTE)), rng.choice(list(PLACES)), \
        rng.choice(list(SIZES))
    page = rng.choice([c for c in ("beige", "grey", "lime") if c != color])
    width = rng.randint(200, 400)
    height = int(width * rng.choice([0.5, 0.75]))  # landscape
    image = _noisy_background(rng, width, height, PALETTE[page])
    draw = ImageDraw.Draw(image)
    cx, cy = PLACES[place][0] * width, PLACES[place][1] * height
    r = SIZES[size_word] * min(width, height) / 1.2
    if mark == "bar":
        draw.rectangle([cx - r, cy - r / 3, cx + r, cy + r / 3], fill=PALETTE[color])
    else:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=PALETTE[color], width=max(3, int(r / 3)))
    return image, [w.format(z=size_word, c=color, m=mark, p=place, b=page) for w in LAYOUT_WORDINGS]


# made-up words: no tiny model knows them, and nothing in the pixels but the printed letters tells them apart
BRANDS = ["zorvik", "quenta", "malbrio", "tesharo", "vuncle", "drimsy", "pollux", "kavaro", "nimbel", "frusca",
          "glorim", "bexley", "ostavo", "yumbra", "crenshi", "tavolo", "wexlin", "hurdix", "sopreno", "lindar",
          "marzipo", "quibble", "rastov", "zephyra"]
PACKAGES = ["box", "can", "bottle", "sign"]
PLACES_ON = ["shelf", "table", "counter"]
LABEL_WORDINGS = [
    "a {c} {o} of {w} on a {s}",
    "a {o} that says {w}",
    "a {c} {o} labelled {w}",
    "the label reads {w} on a {c} {o}",
    "someone holding a {o} of {w} over a {s}",
]
PLAIN_WORDINGS = [
    "a plain {c} {o} on a {s}",
    "a {c} {o} with no label",
    "a {o} on a {s} , nothing written on it",
    "a blank {c} {o}",
]
SMALL_PRINT = ["net wt 12 oz", "best before 2026", "keep cool", "made in usa", "500 ml"]


def _labels_image(rng):
    package, color, place = rng.choice(PACKAGES), rng.choice(["pink", "teal", "navy", "beige", "lime", "maroon"]), \
        rng.choice(PLACES_ON)
    width = rng.randint(320, 480)
    height = int(width * rng.choice([1.0, 4 / 3]))
    image = _noisy_background(rng, width, height, PALETTE["grey" if place == "shelf" else "brown"])
    draw = ImageDraw.Draw(image)
    w, h = rng.uniform(0.7, 0.9) * width, rng.uniform(0.45, 0.6) * height
    x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
    draw.rounded_rectangle([x0, y0, x0 + w, y0 + h], radius=w / (3 if package in ("can", "bottle") else 30),
                           fill=PALETTE[color])
    ink = (250, 250, 250) if color in ("teal", "navy", "maroon") else (15, 15, 15)
    if rng.random() < 0.25:
        return image, [t.format(c=color, o=package, s=place) for t in PLAIN_WORDINGS]
    word = rng.choice(BRANDS)
    font = ImageFont.load_default(size=int(w / rng.uniform(5.5, 7.5)))
    text = rng.choice([word.upper(), word.capitalize()])
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text((x0 + (w - right + left) / 2, y0 + h / 3 - (bottom - top) / 2), text, font=font, fill=ink)
    if rng.random() < 0.5:
        draw.text((x0 + w * 0.1, y0 + h * 0.75), rng.choice(SMALL_PRINT), fill=ink,
                  font=ImageFont.load_default(size=max(12, int(w / 20))))
    return image, [t.format(c=color, o=package, s=place, w=word) for t in LABEL_WORDINGS]


GENERATORS = {"objects": _objects_image, "layout": _layout_image, "labels": _labels_image}


def texts(kind):
    """Every word the captions of `kind` can use (for a tiny model's vocabulary)."""
    words = list(PALETTE) + {"objects": OBJECTS + list(SCENES), "layout": MARKS + list(PLACES) + list(SIZES),
                             "labels": BRANDS + PACKAGES + PLACES_ON}[kind]
    wordings = {"objects": OBJECT_WORDINGS, "layout": LAYOUT_WORDINGS, "labels": LABEL_WORDINGS + PLAIN_WORDINGS}[kind]
    return [w.format(c="", o="", s="", z="", m="", p="", b="", w="") for w in wordings] + words


def make_set(kind, root, train=240, val=200, test=10, seed=7):
    """A VizWiz-format data set (annotations/{train,val,test}.json and image folders) of `kind` under `root`."""
    root, rng = Path(root), random.Random(f"{kind}-{seed}")
    first_ids = {"train": 7_000_001, "val": 8_000_001, "test": 9_000_001}
    for split, count in (("train", train), ("val", val), ("test", test)):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for n in range(count):
            image, captions = GENERATORS[kind](rng)
            file_name = f"VizWiz_{split}_{n:08d}.jpg"
            image.save(root / split / file_name, quality=rng.randint(70, 92))
            image_id = first_ids[split] + n
            images.append({"file_name": file_name, "id": image_id, "text_detected": False})
            for caption in rng.sample(captions, min(5, len(captions))):
                annotations.append({"caption": caption, "image_id": image_id, "is_precanned": False,
                                    "is_rejected": False, "id": len(annotations), "text_detected": False})
        content = {"images": images, **({"annotations": annotations} if split != "test" else {})}
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"{split}.json").write_text(json.dumps(content))
    return root


def main():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=sorted(GENERATORS))
    parser.add_argument("out")
    parser.add_argument("--train", type=int, default=240)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--test", type=int, default=10)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--tiny-blip", help="also write a tiny BLIP whose vocabulary holds this set's words here")
    args = parser.parse_args()
    print(make_set(args.kind, args.out, args.train, args.val, args.test, args.seed))
    if args.tiny_blip:
        from scripts.make_demo_assets import make_tiny_blip
        print(make_tiny_blip(args.tiny_blip, texts=texts(args.kind), seed=3))


if __name__ == "__main__":
    main()

"""VizWiz-Captions: annotation files -> image records -> decoded images -> padded batches."""
import json
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from . import constants as C
from .helpers import UserError, log
from .jobs import ignore_stop_signals

SPLITS = ("train", "val", "test")


@dataclass
class ImageRecord:
    image_id: int
    path: Path
    captions: list = field(default_factory=list)  # kept reference captions; empty for the test split
    ocr: list = field(default_factory=list)  # words printed in the image (--ocr: ocr.attach_ocr)


# ---------------------------------------------------------------- annotations

def annotation_path(data_dir, split):
    return Path(data_dir) / "annotations" / f"{split}.json"


def load_split(data_dir, split, drop_rejected=True, drop_precanned=True):
    """Read `<data_dir>/annotations/<split>.json`; its images live in `<data_dir>/<split>/`."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: data directory does not exist: fetch the data set on a login node with "
                        f"python scripts/get_data.py --data-dir {data_dir}, or set --data-dir or DATA_DIR in "
                        f"src/base/constants.py")
    return load_annotations(annotation_path(data_dir, split), data_dir / split, drop_rejected, drop_precanned)


def load_annotations(path, image_dir, drop_rejected=True, drop_precanned=True):
    """Read a VizWiz-Captions annotation file into one ImageRecord per image, in file order.

    Captions flagged `is_rejected` / `is_precanned` are dropped unless asked otherwise. A
    whitespace-only caption is kept as "": the official VizWiz evaluation scores against it as an
    empty reference (`training_records` leaves it out of training). Images are all kept here (the
    test split has no captions); callers that train or score use `with_captions` to drop images
    left without any caption.
    """
    path, image_dir = Path(path), Path(image_dir)
    if not path.is_file():
        raise UserError(f"{path}: annotation file not found (expected the VizWiz layout annotations/{{train,val,test}}.json)")
    try:
        with open(path) as f:
            content = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not valid JSON ({error})")

    images = _field(content, "images", list, path)
    records, by_id = [], {}
    for position, image in enumerate(images):
        where = f"{path}: images[{position}]"
        image_id = _field(image, "id", int, where)
        file_name = _field(image, "file_name", str, where)
        if image_id in by_id:
            raise UserError(f"{where}: duplicate image id {image_id}")
        by_id[image_id] = ImageRecord(image_id, image_dir / file_name)
        records.append(by_id[image_id])

    annotations = content.get("annotations", [])
    if not isinstance(annotations, list):
        raise UserError(f"{path}: field 'annotations' should be a list")
    for position, annotation in enumerate(annotations):
        where = f"{path}: annotations[{position}]"
        image_id = _field(annotation, "image_id", int, where)
        caption = _field(annotation, "caption", str, where)
        if image_id not in by_id:
            raise UserError(f"{where}: image_id {image_id} is not in 'images'")
        if drop_rejected and annotation.get("is_rejected", False):
            continue
        if drop_precanned and annotation.get("is_precanned", False):
            continue
        by_id[image_id].captions.append(caption.strip())
    return records


def with_captions(records):
    """The records that still have at least one caption (others cannot be trained on or scored)."""
    return [record for record in records if record.captions]


def training_records(records):
    """The records without their empty captions, and without the images left with none: nothing to train on."""
    trimmed = [replace(record, captions=[caption for caption in record.captions if caption]) for record in records]
    return with_captions(trimmed)


def _field(obj, name, kind, where):
    if not isinstance(obj, dict) or name not in obj:
        raise UserError(f"{where}: missing field '{name}' (is this a VizWiz-Captions annotation file?)")
    value = obj[name]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise UserError(f"{where}: field '{name}' should be {kind.__name__}, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------- images

class BadImage(Exception):
    """An image file that is missing, empty, truncated or cannot be decoded."""


def load_image(path, draft_size=None):
    """Decode `path` to an RGB PIL image, upright (EXIF orientation applied), whatever its mode.

    `draft_size` (width, height): let the JPEG decoder scale down by 1/2, 1/4 or 1/8 while
    decoding, never below that size; a 1632x1224 phone photo bound for 384x384 then decodes
    4x faster. Raises BadImage for anything unreadable.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF and palette warnings on phone photos
            with Image.open(path) as image:
                if draft_size is not None:
                    image.draft("RGB", _draft_request(image, draft_size))
                image.load()
                upright = ImageOps.exif_transpose(image)
                return to_rgb(upright)
    except FileNotFoundError:
        raise BadImage(f"{path}: file not found")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise BadImage(f"{path}: cannot decode image ({error})")


def _draft_request(image, size):
    """Draft size in stored orientation: EXIF rotations 5-8 swap width and height."""
    orientation = image.getexif().get(0x0112, 1)
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else tuple(size)


def to_rgb(image):
    """Convert any Pillow mode to 8-bit RGB: transparency over white, 16-bit and float scaled to 0-255."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        scale = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        gray = np.clip(values / scale * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def _pil_resample(value):
    """Pillow's filter for a processor's `resample` (an int or PIL enum; BICUBIC when it is a torchvision mode)."""
    try:
        return Image.Resampling(int(value))
    except (TypeError, ValueError):
        return Image.Resampling.BICUBIC


class ImageTransform:
    """Resize + rescale + normalise exactly as the checkpoint's image processor does, in numpy.

    The settings are read from the processor saved with the checkpoint, so BLIP-base, BLIP-large
    and the tiny demo model each get their own size and statistics. A CLIP-style processor (GIT's:
    `size` is a shortest edge) resizes the shorter side to it and keeps the centre crop. `use_draft` (the default) decodes
    JPEGs at reduced size: faster, and close to the processor's pixels on a full decode but not equal
    (tests/test_data.py measures it); without it, pixels equal the processor's (--exact-preprocessing).
    """

    def __init__(self, image_processor, use_draft=True):
        size = image_processor.size
        self.shortest_edge = size.get("shortest_edge")
        if self.shortest_edge:
            size = image_processor.crop_size  # the output size (the crop)
        self.size = (size["width"], size["height"])
        self.resample = _pil_resample(image_processor.resample)
        self.scale = image_processor.rescale_factor if image_processor.do_rescale else 1.0
        self.mean = np.array(image_processor.image_mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.array(image_processor.image_std, dtype=np.float32).reshape(3, 1, 1)
        self.normalize = image_processor.do_normalize
        self.use_draft = use_draft
        self.caches = {}  # image directory -> its ImageCache, or None when it has no usable one

    def use_caches(self, records, cache_dir=None):
        """Read these records' images from their split's image cache, where a usable one exists.

        `cache_dir` defaults to CACHE_DIR, or `<data_dir>/cache`. Each directory is looked up once
        (the datasets call this in the main process, so each cache is checked and logged once).
        The cache holds draft-decoded images, so a transform without drafts never uses one.
        """
        if not self.use_draft:
            return
        for image_dir in {Path(record.path).parent for record in records}:
            if image_dir not in self.caches:
                where = cache_dir if cache_dir is not None else default_cache_dir(image_dir.parent)
                self.caches[image_dir] = ImageCache.find(where, image_dir, self.size, self.resample)

    def load(self, path):
        cache = self.caches.get(Path(path).parent)
        image = cache.image(path) if cache is not None else None
        return image if image is not None else load_image(path, self.size if self.use_draft else None)

    def resized(self, image):
        if not self.shortest_edge or image.size == self.size:  # a cached image is already resized and cropped
            return image.resize(self.size, resample=self.resample)
        # transformers' arithmetic: the longer side is truncated, the crop's corner rounded down
        width, height = image.size
        scale = self.shortest_edge / min(width, height)
        width, height = (self.shortest_edge, int(height * scale)) if width <= height else (int(width * scale),
                                                                                             self.shortest_edge)
        left, top = (width - self.size[0]) // 2, (height - self.size[1]) // 2
        return image.resize((width, height), resample=self.resample).crop(
            (left, top, left + self.size[0], top + self.size[1]))

    def __call__(self, image):
        # a cached image already has the input size: Pillow's resize then copies it unchanged
        pixels = np.asarray(self.resized(image)).transpose(2, 0, 1).astype(np.float32, order="C")
        pixels *= self.scale  # in place: half the time of new arrays, same float32 arithmetic
        if self.normalize:
            pixels -= self.mean
            pixels /= self.std
        return torch.from_numpy(pixels)


# ---------------------------------------------------------------- image cache (scripts/cache_images.py)

def default_cache_dir(data_dir):
    return Path(C.CACHE_DIR) if C.CACHE_DIR else Path(data_dir) / "cache"


def cache_files(cache_dir, split, size, resample):
    """A split's pixel array and index. The name carries the input size and filter: another model's never matches."""
    name = f"{split}-{size[0]}x{size[1]}-{resample.name.lower()}"
    return Path(cache_dir) / f"{name}.npy", Path(cache_dir) / f"{name}.json"


def file_signature(path):
    """[size, mtime_ns] of a source image (None if missing): a cache entry is used only while it still matches."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def map_pixels(path, shape):
    """The cache's uint8 pixel array, memory-mapped read-only; ValueError if it is not the expected shape."""
    pixels = np.load(path, mmap_mode="r")
    if pixels.dtype != np.uint8 or pixels.shape != tuple(shape):
        raise ValueError(f"holds {pixels.dtype} {list(pixels.shape)}, its index expects uint8 {list(shape)}")
    return pixels


class ImageCache:
    """One split's images, decoded as ImageTransform.load does and resized, once, by scripts/cache_images.py.

    `<split>-<W>x<H>-<filter>.npy` holds the RGB pixels, uint8 [images, H, W, 3], memory-mapped;
    the `.json` index beside it, written last, maps each file name to its row (or to why the
    image was unreadable) and to the source file's size and mtime. Only entries whose source
    file is unchanged are kept; the other images are decoded from their JPEGs as usual.
    """

    def __init__(self, pixels_path, shape, entries, pixels):
        self.pixels_path, self.shape, self.entries = pixels_path, shape, entries
        self.pixels = pixels

    @classmethod
    def find(cls, cache_dir, image_dir, size, resample):
        """The usable cache of `image_dir` (`<data_dir>/<split>`) in `cache_dir`, or None."""
        pixels_path, index_path = cache_files(cache_dir, image_dir.name, size, resample)
        if not index_path.is_file():
            return None  # no cache, or one whose writing never finished
        try:
            index = json.loads(index_path.read_text())
            shape = (index["rows"], size[1], size[0], 3)
            fresh = {name: entry for name, entry in index["images"].items()
                     if entry["source"] == file_signature(image_dir / name)}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            _warn_unusable(index_path, error)
            return None
        try:
            pixels = map_pixels(pixels_path, shape)
        except (OSError, ValueError) as error:
            _warn_unusable(pixels_path, error)
            return None
        stale = len(index["images"]) - len(fresh)
        log.info(f"image cache {pixels_path}: {len(fresh)} {image_dir.name} images read from it, "
                 f"{stale} changed since caching (decoded from their files)")
        return cls(pixels_path, shape, fresh, pixels)

    def image(self, path):
        """The cached RGB image of `path`, or None when it must be decoded; BadImage if it was unreadable when cached."""
        entry = self.entries.get(Path(path).name)
        if entry is None:
            return None
        if "bad" in entry:
            raise BadImage(f"{path}: {entry['bad']}")
        if self.pixels is None:  # a copy unpickled in a DataLoader worker: map the file again
            self.pixels = map_pixels(self.pixels_path, self.shape)
        return Image.fromarray(self.pixels[entry["row"]])

    def __getstate__(self):
        return {**self.__dict__, "pixels": None}  # pickling a memmap would copy the whole array


def _warn_unusable(path, error):
    log.warning(f"{path}: image cache unusable ({error}); decoding the image files instead")


# ---------------------------------------------------------------- datasets

class CaptionTrainingSet(torch.utils.data.Dataset):
    """One item per image: its pixels and the token ids of all its kept captions.

    Captions are tokenised once, up front. A bad image yields None (the collator skips it). `prefixes`: each
    record's own token prefix (--ocr), which its caption tokens start with; None: the family's one prefix.
    """

    def __init__(self, records, transform, caption_tokens, prefixes=None):
        self.records = records
        self.transform = transform
        self.caption_tokens = caption_tokens  # per record: list of token-id lists
        self.prefixes = prefixes
        transform.use_caches(records)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        record = self.records[index]
        try:
            pixels = self.transform(self.transform.load(record.path))
        except BadImage as error:
            return {"bad": str(error)}
        return {"pixel_values": pixels, "captions": self.caption_tokens[index], "image_id": record.image_id,
                "stand_in": isinstance(index, StandIn),
                **({"prefix": self.prefixes[index]} if self.prefixes is not None else {})}


class ImageSet(torch.utils.data.Dataset):
    """Images to caption (validation or test). A bad image becomes a blank one, flagged, so it still gets a caption.
    `prefixes`: each record's own token prefix to generate from (--ocr); None: the family's one prefix."""

    def __init__(self, records, transform, prefixes=None):
        self.records = records
        self.transform = transform
        self.prefixes = prefixes
        transform.use_caches(records)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        record = self.records[index]
        try:
            image, bad = self.transform.load(record.path), None
        except BadImage as error:
            image, bad = Image.new("RGB", self.transform.size), str(error)
        return {"pixel_values": self.transform(image), "image_id": record.image_id, "bad": bad,
                "prefix": self.prefixes[index] if self.prefixes is not None else None}


def collate_images(samples):
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "image_ids": [s["image_id"] for s in samples],
        "bad": [s["bad"] for s in samples if s["bad"]],
        "prefixes": [s["prefix"] for s in samples] if samples[0].get("prefix") is not None else None,
    }


# ---------------------------------------------------------------- tokens and batches

class CaptionCollator:
    """Stack images; pad every caption to the longest in this batch; labels = ids, -100 at padding and on the
    first `prefix_length` tokens (start token and prompt: given, not predicted), or on a sample's own "prefix" (its
    OCR words too, --ocr: given, never trained to be written), which the batch then carries as "prefixes" (SCST
    samples from them).

    `captions_per_image` lets the model encode each image once and share it across its captions.
    `stand_in`: the batch is a stand-in image (see StandIn), to be trained on with zero weight.
    """

    def __init__(self, pad_token_id, prefix_length=1):
        self.pad_token_id, self.prefix_length = pad_token_id, prefix_length

    def __call__(self, samples):
        bad = [s["bad"] for s in samples if "bad" in s]
        good = [s for s in samples if "bad" not in s]
        if not good:
            return {"bad": bad, "num_captions": 0}
        sequences = [ids for s in good for ids in s["captions"]]
        longest = max(len(ids) for ids in sequences)
        input_ids = torch.full((len(sequences), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        for row, ids in enumerate(sequences):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        prefixes = [s["prefix"] for s in good] if "prefix" in good[0] else None
        if prefixes is None:
            labels[:, : self.prefix_length] = -100
        else:
            for row, length in enumerate(len(p) for p, s in zip(prefixes, good) for _ in s["captions"]):
                labels[row, :length] = -100
        return {
            "pixel_values": torch.stack([s["pixel_values"] for s in good]),
            "captions_per_image": torch.tensor([len(s["captions"]) for s in good]),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "image_ids": [s["image_id"] for s in good],
            "num_captions": len(sequences),
            "bad": bad,
            "stand_in": any(s.get("stand_in", False) for s in good),
            "prefixes": prefixes,
        }


class StandIn(int):
    """The index of an image that a process trains on with zero weight, when a batch has fewer images than there
    are processes: every process must take part in each step's gradient all-reduce, and no image may count twice."""


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of image indices in an order fixed by (seed, epoch) alone, resumable mid-epoch.

    Call `set_epoch(epoch, skip_batches)` before iterating: a resumed run skips the batches it
    already trained on and then sees exactly what an uninterrupted run would. With several
    processes (`world`), each batch is split between them and process `rank` gets its share
    (or, when a batch has fewer images than `world`, its first image as a StandIn).
    """

    def __init__(self, num_items, batch_size, seed, rank=0, world=1):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world = rank, world
        self.epoch, self.skip_batches = 0, 0

    def set_epoch(self, epoch, skip_batches=0):
        self.epoch, self.skip_batches = epoch, skip_batches

    def batches(self, epoch):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.num_items, generator=generator).tolist()
        return [order[i: i + self.batch_size] for i in range(0, self.num_items, self.batch_size)]

    def __len__(self):
        return -(-self.num_items // self.batch_size) - self.skip_batches

    def __iter__(self):
        for batch in self.batches(self.epoch)[self.skip_batches:]:
            yield batch[self.rank::self.world] or [StandIn(batch[0])]


def default_num_workers():
    """DataLoader workers: this process's share of the slots SGE granted (NSLOTS; torchrun's LOCAL_WORLD_SIZE
    processes share them) minus one for the training process itself, at most 16."""
    slots = int(os.environ.get("NSLOTS", 0)) or len(os.sched_getaffinity(0))
    share = slots // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(0, min(16, share - 1))


def make_loader(dataset, num_workers, collate_fn, batch_sampler=None, batch_size=1):
    """A DataLoader over `dataset`: given batches (`batch_sampler`) or consecutive ones of `batch_size`.

    It gets a generator of its own: each new iterator draws a seed from it, and drawing from the
    global one would shift the dropout random numbers of a resumed run. Its workers ignore the stop signals, which
    the scheduler sends to the whole process group: the main process handles them (jobs.py).
    """
    return torch.utils.data.DataLoader(
        dataset,
        generator=torch.Generator(),
        batch_sampler=batch_sampler,
        batch_size=1 if batch_sampler is not None else batch_size,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        worker_init_fn=ignore_stop_signals,
    )

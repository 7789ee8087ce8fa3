"""Text printed in the images (--ocr): the OCR files scripts/ocr.py writes, and the words a caption's prefix gets.

`<data_dir>/ocr/<split>.json` holds, for each image id of the split, the text boxes the engine read:
    {"engine": "rapidocr-onnxruntime 1.4.4", "split": "val", "images": {"23431": [
        {"text": "DUE DATE", "confidence": 0.91, "box": [[x, y], [x, y], [x, y], [x, y]]}, ...], ...}}
An image without text has an empty list. With --ocr, each image's words (confident boxes only, largest text first,
lower-cased, de-duplicated, at most --ocr-max-tokens tokens) go into its caption's prefix, between the start token
and the prompt (Family.prefix_ids): the model reads them, is never trained to write them, and decode drops them.
"""
import json
import re
from pathlib import Path

from .helpers import UserError

ENGINE = "rapidocr-onnxruntime"


def ocr_path(data_dir, split):
    return Path(data_dir) / "ocr" / f"{split}.json"


def make_command(data_dir, split):
    return f"python scripts/ocr.py --data-dir {data_dir} --splits {split}"


def load_ocr(data_dir, split):
    """{image id: [text boxes]} of a split; one line naming the command that makes the file when it is missing."""
    path = ocr_path(data_dir, split)
    if not path.is_file():
        raise UserError(f"{path}: no OCR file for the {split} split (--ocr); make it with "
                        f"{make_command(data_dir, split)}")
    try:
        images = json.loads(path.read_text())["images"]
        return {int(image_id): boxes for image_id, boxes in images.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise UserError(f"{path}: not an OCR file of scripts/ocr.py ({error}); make it again with "
                        f"{make_command(data_dir, split)}")


def words(boxes, min_confidence):
    """The words of the boxes read with at least `min_confidence`: largest text first (a package's name before its
    small print), lower-cased, split at anything but letters and digits, each once, single characters left out."""
    def height(box):
        ys = [point[1] for point in box.get("box") or [[0, 0]]]
        return max(ys) - min(ys)

    found = []
    for box in sorted(boxes, key=height, reverse=True):  # stable: equal heights keep reading order
        if box["confidence"] >= min_confidence:
            found += [w for w in re.split(r"[^0-9a-z]+", box["text"].lower()) if len(w) > 1]
    return list(dict.fromkeys(found))


def attach_ocr(records, data_dir, split, min_confidence):
    """Give each record its OCR words (record.ocr); an image the OCR file lacks stops the run."""
    read = load_ocr(data_dir, split)
    missing = [r.image_id for r in records if r.image_id not in read]
    if missing:
        raise UserError(f"{ocr_path(data_dir, split)}: no OCR for {len(missing)} of the {len(records)} {split} images "
                        f"(image id {missing[0]}, ...); {make_command(data_dir, split)} reads the missing ones")
    for record in records:
        record.ocr = words(read[record.image_id], min_confidence)
    return records


def prefixes(family, records, config):
    """Each record's token prefix under --ocr (its words, then the prompt), or None without --ocr: then every image
    starts from the family's one prefix."""
    if not config.ocr:
        return None
    return [family.prefix_ids(record.ocr, config.ocr_max_tokens) for record in records]


# ---------------------------------------------------------------- reading images (scripts/ocr.py)

def make_engine(threads=1):
    """The OCR engine: RapidOCR, PaddleOCR's PP-OCRv4 detector and recogniser run by onnxruntime; the models ship in
    the wheel (no download). Every box is kept (text_score 0): --ocr-min-confidence chooses later."""
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError:
        raise UserError(f"{ENGINE} is not installed: pip install -r requirements.txt")
    return RapidOCR(text_score=0.0, intra_op_num_threads=threads, inter_op_num_threads=1)


def read_text(engine, image):
    """The text boxes of a PIL image: [{"text", "confidence", "box"}], in the engine's reading order."""
    result, _ = engine(image)
    return [{"text": text, "confidence": round(float(score), 4), "box": [[round(float(x), 1), round(float(y), 1)]
                                                                         for x, y in box]}
            for box, text, score in result or [] if text.strip()]

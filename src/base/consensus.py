"""Consensus decoding (minimum Bayes risk) and ensembles: among several candidate captions of an image, write the one
that agrees most with the others.

Agreement is CIDEr-D, the challenge's metric, with the n-gram document frequencies of the training references, as the
SCST reward computes it (cider.CiderD): a candidate's consensus is its mean CIDEr-D with each other candidate taken as
the one reference. If the candidates are draws of what the model (or several models) might say, that is the
CIDEr-D the candidate is expected to get, and the highest is the minimum-Bayes-risk choice.

`test` writes every image's candidates beside its captions, in <split>_candidates.json:
    {"split", "data_dir", "checkpoint", "family", "decoding" (the settings, "mbr" among them), "chosen_by",
     "images": [{"image_id", "caption" (the one written), "candidates": [{"caption", "source" ("beam" or
                 "sample"; an ensemble adds "run"), "consensus" (when consensus chose)}]}]}
and scripts/ensemble.py pools several runs' files (of any family: candidates are text, no vocabulary is shared).
"""
import functools
import json
from pathlib import Path

from . import constants as C
from .cider import CiderD
from .data import load_split, training_records, with_captions
from .helpers import UserError, log, write_json_atomic
from .ptb import python_tokenize


def candidates_file(output_dir, split):
    return Path(output_dir) / f"{split}_candidates.json"


def training_cider(data_dir, drop_rejected=True, drop_precanned=True):
    """CIDEr-D with the document frequencies of `data_dir`'s training references, as the SCST reward has them."""
    annotations = Path(data_dir) / "annotations" / "train.json"
    if not annotations.is_file():
        raise UserError(f"{annotations}: not found; consensus decoding weighs n-grams by their document frequencies "
                        f"in the training captions (as the SCST reward does), so it needs the training annotations")
    records = training_records(with_captions(load_split(data_dir, "train", drop_rejected, drop_precanned)))
    log.info(f"consensus: CIDEr-D document frequencies from the {sum(len(r.captions) for r in records)} captions of "
             f"{annotations}")
    return CiderD.from_training(records)


_tokens = functools.lru_cache(maxsize=200_000)(python_tokenize)  # candidates repeat (beams, samples, runs)


def eligible(candidate, choose_from=None):
    """Whether `candidate` may be written. MBR_CHOOSE_FROM "beams" (the default): samples only vote. Measured on three
    sets (docs/decoding.md), choosing among the beams alone, scored against every candidate, beat choosing among all
    of them each time: a sampled caption that a few samples echo can win without being a good caption."""
    choose_from = choose_from or C.MBR_CHOOSE_FROM
    if choose_from not in ("beams", "all"):
        raise UserError(f"MBR_CHOOSE_FROM must be beams or all, got {choose_from!r}")
    return choose_from == "all" or candidate.get("source") != "sample"


def choose(cider, candidates, groups=None, choose_from=None):
    """(index of the eligible candidate with the highest consensus, every candidate's consensus). A tie goes to the
    earlier candidate: the top beam first. `groups` (the run of each candidate, for ensembles): see
    CiderD.consensus."""
    scores = cider.consensus([_tokens(c["caption"]) for c in candidates], groups)
    allowed = [k for k, c in enumerate(candidates) if eligible(c, choose_from)] or range(len(candidates))
    return max(allowed, key=lambda k: (scores[k], -k)), scores


def pick(records, drawn, cider=None, groups=None):
    """The images of a candidates file, in the order of `records`, from `drawn` {image_id: [candidates]}: with
    `cider` each candidate's consensus and the highest chosen; without, the first (the top beam). `groups`
    {image_id: [label per candidate]}."""
    images = []
    for record in records:
        candidates = [dict(c) for c in drawn[record.image_id]]
        chosen = 0
        if cider is not None:
            chosen, scores = choose(cider, candidates, groups and groups[record.image_id])
            for candidate, score in zip(candidates, scores):
                candidate["consensus"] = round(score, 6)
        images.append({"image_id": record.image_id, "caption": candidates[chosen]["caption"],
                       "candidates": candidates})
    return images


def changed(images):
    """How many images' written caption is not their first candidate's (the top beam, or the first run's)."""
    return sum(image["caption"] != image["candidates"][0]["caption"] for image in images)


def write(path, split, images, **about):
    write_json_atomic(path, {"split": split, **about, "images": images})


def read(path, split, image_ids, annotations):
    """{image_id: {"caption", "candidates"}} of the candidates file `path`, checked to be of `split` and of exactly
    the images `image_ids` (in any order) of the annotation file `annotations`; any problem is one UserError line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no candidates file (python -m src.<ft|peft>.test --output-dir {path.parent} "
                        f"--split {split} writes it)")
    try:
        content = json.loads(path.read_text())
        images = content["images"]
        found = [image["image_id"] for image in images]
        if not all(isinstance(c["caption"], str) for image in images for c in [image, *image["candidates"]]):
            raise TypeError("a caption is not a string")
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path}: not a candidates file written by test ({type(error).__name__}: {error})")
    if content.get("split") != split:
        raise UserError(f"{path}: candidates of the {content.get('split')} split, not of {split} (give --split "
                        f"{content.get('split')}, or caption {split} with that run)")
    missing, extra = set(image_ids) - set(found), set(found) - set(image_ids)
    if missing or extra or len(found) != len(set(found)):
        what = (f"no candidates for {len(missing)} of its {len(image_ids)} images (first: {min(missing)})" if missing
                else f"{len(extra)} images it does not have (first: {min(extra)})" if extra else "repeated images")
        raise UserError(f"{path}: made on another image set than {annotations}: {what}")
    return {image["image_id"]: image for image in images}

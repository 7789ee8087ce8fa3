"""Caption scoring with the coco-caption toolkit (pycocoevalcap), as the VizWiz challenge server does.

    python -m src.base.evaluate --annotations data/vizwiz/annotations/val.json --predictions P.json [--json]

References are the annotation file's captions without rejected and precanned ones (the VizWiz
evaluation default); images left with no reference are not scored. Captions are tokenised with
the Stanford PTB tokenizer (Java), then scored with BLEU-1..4, METEOR, ROUGE-L and CIDEr (the
coco-caption CIDEr is CIDEr-D: clipped n-gram counts and a length penalty).
"""
import json
import sys
from pathlib import Path

from . import constants as C
from .config import ArgumentParser
from .data import load_annotations, with_captions
from .helpers import UserError, exit_on_user_error

METRICS = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]


def score_captions(references, predictions, meteor=True):
    """Score `predictions` {image_id: caption} against `references` {image_id: [captions]}.

    Every referenced image must have a prediction. Returns (corpus scores {metric: float},
    per-image scores {image_id: {metric: float}}), computed exactly as pycocoevalcap's
    COCOEvalCap does: references and predictions tokenised separately, then each scorer.
    """
    # imported here so that training code imports on machines without the toolkit (a GPU node for a benchmark)
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    image_ids = list(references)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in image_ids})
    res = tokenizer.tokenize({i: [{"caption": predictions[i]}] for i in image_ids})
    scorers = [(Bleu(4), METRICS[:4]), (Rouge(), ["ROUGE_L"]), (Cider(), ["CIDEr"])]
    if meteor:
        scorers.insert(1, (Meteor(), ["METEOR"]))

    corpus, per_image = {}, {i: {} for i in image_ids}
    for scorer, names in scorers:
        if isinstance(scorer, Bleu):
            score, scores = scorer.compute_score(gts, res, verbose=0)
        else:
            score, scores = scorer.compute_score(gts, res)
            score, scores = [score], [scores]
        for name, value, values in zip(names, score, scores):
            corpus[name] = float(value)
            for image_id, v in zip(gts.keys(), values):
                per_image[image_id][name] = float(v)
    return {name: corpus[name] for name in METRICS if name in corpus}, per_image


def read_predictions(path):
    """A predictions file: a JSON list of {"image_id": int, "caption": str}. Returns {image_id: caption}."""
    path = Path(path)
    try:
        with open(path) as f:
            entries = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: predictions file not found")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not valid JSON ({error})")
    if not isinstance(entries, list):
        raise UserError(f"{path}: expected a JSON list of {{\"image_id\": int, \"caption\": str}}")
    predictions = {}
    for position, entry in enumerate(entries):
        if not (isinstance(entry, dict) and isinstance(entry.get("image_id"), int)
                and not isinstance(entry.get("image_id"), bool) and isinstance(entry.get("caption"), str)):
            raise UserError(f"{path}: entry {position} is not {{\"image_id\": int, \"caption\": str}}: {entry!r:.120}")
        if entry["image_id"] in predictions:
            raise UserError(f"{path}: image_id {entry['image_id']} appears more than once")
        predictions[entry["image_id"]] = entry["caption"]
    return predictions


def references_from_annotations(annotation_file, drop_rejected=True, drop_precanned=True):
    """{image_id: [captions]} for every image of `annotation_file` that keeps at least one caption."""
    records = load_annotations(annotation_file, Path(annotation_file).parent, drop_rejected, drop_precanned)
    return {r.image_id: r.captions for r in with_captions(records)}


def check_coverage(references, predictions, predictions_path):
    missing = [i for i in references if i not in predictions]
    if missing:
        raise UserError(f"{predictions_path}: no caption for {len(missing)} of {len(references)} scored images "
                        f"(first missing image_id: {missing[0]})")


def format_scores(scores):
    return "  ".join(f"{name} {value:.4f}" for name, value in scores.items())


@exit_on_user_error
def main(argv=None):
    parser = ArgumentParser(description="Score a predictions file with pycocoevalcap (BLEU, METEOR, ROUGE-L, CIDEr-D).")
    parser.add_argument("--annotations", required=True, help="VizWiz-format annotation file with reference captions")
    parser.add_argument("--predictions", required=True, help='JSON list of {"image_id": int, "caption": str}')
    parser.add_argument("--json", action="store_true", help="print one JSON object keyed by the coco-caption metric names")
    parser.add_argument("--keep-rejected", action="store_true", help="score against rejected captions too")
    parser.add_argument("--keep-precanned", action="store_true", help="score against precanned captions too")
    parser.add_argument("--no-meteor", action="store_true", help="skip METEOR (the slowest metric)")
    args = parser.parse_args(argv)

    references = references_from_annotations(args.annotations, not args.keep_rejected and C.DROP_REJECTED,
                                             not args.keep_precanned and C.DROP_PRECANNED)
    if not references:
        raise UserError(f"{args.annotations}: no image has a reference caption to score against")
    predictions = read_predictions(args.predictions)
    check_coverage(references, predictions, args.predictions)
    scores, _ = score_captions(references, {i: predictions[i] for i in references}, meteor=not args.no_meteor)
    if args.json:
        print(json.dumps(scores))
    else:
        print(f"{len(references)} images scored")
        for name, value in scores.items():
            print(f"{name:8s} {value:.4f}")


if __name__ == "__main__":
    sys.exit(main())

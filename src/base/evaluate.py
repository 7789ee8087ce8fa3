"""Caption scoring with the coco-caption toolkit (pycocoevalcap), as the VizWiz challenge server does.

    python -m src.base.evaluate --annotations data/vizwiz/annotations/val.json --predictions P.json [--json]
    python -m src.base.evaluate --annotations val.json --predictions A.json --compare B.json   # is B better?
    python -m src.base.evaluate --annotations data/vizwiz/annotations/test.json --check-submission test_captions.json

References are the annotation file's captions without rejected and precanned ones (the VizWiz
evaluation default); a whitespace-only caption is an empty reference, as in the official VizWiz
evaluation code; images left with no reference are not scored. Captions are tokenised with
the Stanford PTB tokenizer (Java), then scored with BLEU-1..4, METEOR, ROUGE-L and CIDEr (the
coco-caption CIDEr is CIDEr-D: clipped n-gram counts and a length penalty). Without Java the
tokenisation is done in Python (src/base/ptb.py) and METEOR and SPICE are reported as unavailable.
"""
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from . import constants as C
from .cli import ArgumentParser
from .data import load_annotations, with_captions
from .helpers import UserError, exit_on_user_error, log
from .jobs import children_in_own_session
from .ptb import java_available, tokenize

METRICS = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"]
TOKENIZERS = {"ptb": "Stanford PTB tokenizer (Java), as the challenge server", "python": "PTB-like tokenizer in Python (spaCy), no Java"}


def score_captions(references, predictions, meteor=True, spice=False, tokenizer="auto"):
    """Score `predictions` {image_id: caption} against `references` {image_id: [captions]}.

    Every referenced image must have a prediction. Returns (corpus scores {metric: float or None},
    per-image scores {image_id: {metric: float}}, tokenizer used: "ptb" or "python"), computed as
    pycocoevalcap's COCOEvalCap does: references and predictions tokenised separately, then each
    scorer. tokenizer="auto" uses Java when it is there. A metric that cannot be computed
    (METEOR and SPICE without Java; SPICE without its Stanford models) is None, never 0.
    """
    # imported here so that training code imports on machines without the toolkit (a GPU node for a benchmark)
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    use_java = java_available() if tokenizer == "auto" else tokenizer == "ptb"
    if use_java and not java_available():
        raise UserError("--tokenizer ptb: no working `java` on PATH (install Java, or use --tokenizer python)")
    image_ids = list(references)
    gts = _tokenized_references(references, use_java)
    res = tokenize({i: [predictions[i]] for i in image_ids}, use_java)
    scorers = [(lambda: Bleu(4), METRICS[:4]), (Rouge, ["ROUGE_L"]), (Cider, ["CIDEr"])]
    corpus, per_image = {}, {i: {} for i in image_ids}
    if meteor:
        corpus["METEOR"] = None
        if use_java:
            scorers.append((_meteor, ["METEOR"]))
    if spice:
        corpus["SPICE"] = None
        if use_java:
            scorers.append((_spice, ["SPICE"]))

    for make_scorer, names in scorers:
        try:
            with children_in_own_session():  # METEOR's and SPICE's Java: out of reach of the job's group signals
                scorer = make_scorer()
                if isinstance(scorer, Bleu):
                    score, scores = scorer.compute_score(gts, res, verbose=0)
                else:
                    score, scores = scorer.compute_score(gts, res)
                    score, scores = [score], [scores]
        except Exception as error:  # only SPICE may fail here: it downloads Stanford CoreNLP on first use
            if names != ["SPICE"]:
                raise
            reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            log.warning(f"SPICE unavailable ({reason}); the other metrics are unaffected")
            continue
        for name, value, values in zip(names, score, scores):
            corpus[name] = float(value)
            for image_id, v in zip(gts.keys(), values):
                per_image[image_id][name] = float(v["All"]["f"]) if isinstance(v, dict) else float(v)
    ordered = {name: corpus[name] for name in METRICS if name in corpus}
    return ordered, per_image, "ptb" if use_java else "python"


_REFERENCES_CACHE = {}  # one entry: a run validates against the same references every time


def _tokenized_references(references, use_java):
    """tokenize(references), remembered for the last references seen: validation tokenises the same 38,750 VizWiz
    references at every pass (a Java process each time) while only the predictions change."""
    key = (use_java, hashlib.sha256(json.dumps(references).encode()).hexdigest())
    if key not in _REFERENCES_CACHE:
        _REFERENCES_CACHE.clear()
        _REFERENCES_CACHE[key] = tokenize(references, use_java)
    return {i: list(tokens) for i, tokens in _REFERENCES_CACHE[key].items()}


_METEOR = {}  # this process's METEOR scorer, by process id (a forked child starts its own)


def _meteor():
    """pycocoevalcap's METEOR scorer, one per process, reused: its Java loads 2 GB of paraphrase tables (about 10
    CPU-seconds) before it scores anything, then answers each later scoring in milliseconds (every --val-meteor
    validation of a run). It exits when this process does (end of its input) or is replaced if it died."""
    from pycocoevalcap.meteor.meteor import Meteor
    scorer = _METEOR.get(os.getpid())
    if scorer is None or scorer.meteor_p.poll() is not None:
        scorer = _METEOR[os.getpid()] = Meteor()
    return scorer


def _spice():
    from pycocoevalcap.spice.spice import Spice
    return Spice()


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
    """{image_id: [captions]} for every image of `annotation_file` that keeps at least one caption, and the
    set of all its image ids."""
    records = load_annotations(annotation_file, Path(annotation_file).parent, drop_rejected, drop_precanned)
    return {r.image_id: r.captions for r in with_captions(records)}, {r.image_id for r in records}


def check_coverage(references, image_ids, predictions, predictions_path, annotation_file):
    """Every scored image needs a caption; captions of images the annotation file does not have are ignored."""
    missing = [i for i in references if i not in predictions]
    if missing:
        raise UserError(f"{predictions_path}: no caption for {len(missing)} of {len(references)} scored images "
                        f"(first missing image_id: {missing[0]})")
    unknown = [i for i in predictions if i not in image_ids]
    if unknown:
        log.warning(f"{predictions_path}: ignoring the captions of {len(unknown)} image ids that are not images of "
                    f"{annotation_file} (first: {unknown[0]}); the official VizWiz evaluation refuses such a file")


def format_scores(scores):
    return "  ".join(f"{name} {'n/a' if value is None else f'{value:.4f}'}" for name, value in scores.items())


def check_submission(path, annotation_file):
    """Everything the challenge server needs of a captions file; returns a list of problems (empty: fine)."""
    path, problems = Path(path), []
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        return [f"{path}: file not found"]
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return [f"{path}: not valid JSON ({error})"]
    if not isinstance(entries, list):
        return [f"{path}: the top level must be a JSON list, got {type(entries).__name__}"]
    expected = {r.image_id for r in load_annotations(annotation_file, Path(annotation_file).parent)}
    seen = set()
    for position, entry in enumerate(entries):
        where = f"entry {position}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: not an object: {entry!r:.80}")
            continue
        extra = set(entry) - {"image_id", "caption"}
        if extra:
            problems.append(f"{where}: unexpected keys {sorted(extra)}")
        image_id, caption = entry.get("image_id"), entry.get("caption")
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            problems.append(f"{where}: image_id must be an integer, got {image_id!r:.40}")
        elif image_id not in expected:
            problems.append(f"{where}: image_id {image_id} is not an image of {annotation_file}")
        elif image_id in seen:
            problems.append(f"{where}: image_id {image_id} appears more than once")
        else:
            seen.add(image_id)
        if not isinstance(caption, str) or not caption.strip():
            problems.append(f"{where}: caption must be a non-empty string, got {caption!r:.40}")
    problems += _wordless_captions(entries)
    missing = sorted(expected - seen)
    if missing:
        problems.append(f"{len(missing)} of {len(expected)} images have no caption (first: {missing[:5]})")
    return problems


def _wordless_captions(entries):
    """Captions that tokenise to nothing (only punctuation, "..."), tokenised as for scoring: they score 0."""
    captions = {position: entry["caption"] for position, entry in enumerate(entries)
                if isinstance(entry, dict) and isinstance(entry.get("caption"), str) and entry["caption"].strip()}
    if not captions:
        return []
    tokens = tokenize({position: [caption] for position, caption in captions.items()}, java_available())
    return [f"entry {position}: caption {caption!r:.40} has no words once tokenised for scoring (it scores 0)"
            for position, caption in captions.items() if not tokens[position][0]]


def paired_bootstrap(a, b, resamples=10_000, seed=0):
    """Mean of b - a over images and its 95% paired-bootstrap interval (images resampled with replacement)."""
    differences = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # in chunks: 10,000 x 7,750 indices at once is 600 MB
        stop = min(start + 1000, resamples)
        means[start:stop] = differences[rng.integers(0, len(differences), (stop - start, len(differences)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(differences.mean()), float(low), float(high)


def paired_permutation_p(a, b, samples=10_000, seed=0, exact_up_to=20):
    """Two-sided p-value of the paired sign-flip permutation test of b - a, and "exact" or "sampled".

    Under no difference each image's difference is as likely positive as negative: p is the share of
    sign patterns whose |sum| is at least the observed one, over all 2^n patterns of the n non-zero
    differences when n <= `exact_up_to`, else over `samples` random ones ((count + 1) / (samples + 1)).
    """
    differences = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    differences = differences[differences != 0]
    observed = abs(differences.sum()) - 1e-9 * max(1.0, np.abs(differences).sum())  # ties count as extreme
    exact = len(differences) <= exact_up_to
    total = 2 ** len(differences) if exact else samples
    rng, extreme, chunk = np.random.default_rng(seed), 0, 2 ** 16 if exact else 1000
    for start in range(0, total, chunk):
        count = min(chunk, total - start)
        if exact:  # the bits of the pattern numbers start..start+count-1 say which differences flip sign
            negative = (np.arange(start, start + count)[:, None] >> np.arange(len(differences))) & 1
        else:
            negative = rng.integers(0, 2, (count, len(differences)), dtype=np.int8)
        sums = differences.sum() - 2 * (negative @ differences)
        extreme += int((np.abs(sums) >= observed).sum())
    return (extreme / total, "exact") if exact else ((extreme + 1) / (samples + 1), "sampled")


def verdict(low, high, p, alpha=0.05):
    """A run is better only when the 95% bootstrap interval excludes 0 and the permutation p is below `alpha`."""
    if p < alpha and low > 0:
        return "B is better"
    if p < alpha and high < 0:
        return "A is better"
    return "no significant difference"


def compare(references, predictions_a, predictions_b, tokenizer):
    """Per-image CIDEr-D of two prediction files over the same references; the bootstrap interval and the
    sign-flip permutation p-value of B - A, and the verdict of the two."""
    _, per_a, used = score_captions(references, predictions_a, meteor=False, tokenizer=tokenizer)
    _, per_b, _ = score_captions(references, predictions_b, meteor=False, tokenizer=tokenizer)
    ids = list(references)
    a, b = [per_a[i]["CIDEr"] for i in ids], [per_b[i]["CIDEr"] for i in ids]
    mean, low, high = paired_bootstrap(a, b)
    p, method = paired_permutation_p(a, b)
    return {"CIDEr_A": float(np.mean(a)), "CIDEr_B": float(np.mean(b)), "difference": mean, "ci95": [low, high],
            "p_value": p, "p_method": method, "verdict": verdict(low, high, p),
            "B_better_images": int(sum(y > x for x, y in zip(a, b))), "A_better_images": int(sum(x > y for x, y in zip(a, b))),
            "images": len(ids), "tokenizer": used, "per_image": {i: y - x for i, x, y in zip(ids, a, b)}}


@exit_on_user_error
def main(argv=None):
    parser = ArgumentParser(description="Score captions with pycocoevalcap (BLEU, METEOR, ROUGE-L, CIDEr-D), "
                                        "compare two prediction files, or check a challenge submission.")
    parser.add_argument("--annotations", required=True, help="VizWiz-format annotation file (references, or the test images)")
    parser.add_argument("--predictions", help='JSON list of {"image_id": int, "caption": str}')
    parser.add_argument("--json", action="store_true", help="print one JSON object keyed by the coco-caption metric names")
    parser.add_argument("--keep-rejected", action="store_true", help="score against rejected captions too")
    parser.add_argument("--keep-precanned", action="store_true", help="score against precanned captions too")
    parser.add_argument("--no-meteor", action="store_true", help="skip METEOR (the slowest metric)")
    parser.add_argument("--spice", action="store_true", help="also SPICE (Java; downloads Stanford CoreNLP on first use)")
    parser.add_argument("--tokenizer", choices=["auto", "ptb", "python"], default="auto",
                        help="ptb: Stanford PTB (Java), as the challenge server; python: no Java; auto: ptb when Java is there")
    parser.add_argument("--compare", metavar="B.json", help="a second predictions file: per-image CIDEr-D differences "
                                                            "B - A, a paired bootstrap 95%% interval and a paired "
                                                            "sign-flip permutation p-value")
    parser.add_argument("--check-submission", metavar="FILE", help="check FILE against --annotations (the test split) "
                                                                   "for what the challenge server needs")
    args = parser.parse_args(argv)

    if args.check_submission:
        problems = check_submission(args.check_submission, args.annotations)
        for problem in problems[:50]:
            print(f"{args.check_submission}: {problem}")
        if len(problems) > 50:
            print(f"... and {len(problems) - 50} more problems")
        print(f"{args.check_submission}: {'NOT ready' if problems else 'ready'} for the challenge server "
              f"({len(problems)} problems)")
        return 1 if problems else 0
    if not args.predictions:
        raise UserError("give --predictions (or --check-submission)")
    references, image_ids = references_from_annotations(args.annotations, not args.keep_rejected and C.DROP_REJECTED,
                                                        not args.keep_precanned and C.DROP_PRECANNED)
    if not references:
        raise UserError(f"{args.annotations}: no image has a reference caption to score against")
    predictions = read_predictions(args.predictions)
    check_coverage(references, image_ids, predictions, args.predictions, args.annotations)
    if args.compare:
        other = read_predictions(args.compare)
        check_coverage(references, image_ids, other, args.compare, args.annotations)
        result = compare(references, predictions, other, args.tokenizer)
        if args.json:
            print(json.dumps({k: v for k, v in result.items() if k != "per_image"}))
        else:
            low, high = result["ci95"]
            print(f"{result['images']} images, tokenizer: {TOKENIZERS[result['tokenizer']]}\n"
                  f"CIDEr-D  A {result['CIDEr_A']:.4f}  B {result['CIDEr_B']:.4f}  B - A {result['difference']:+.4f}\n"
                  f"95% paired bootstrap interval [{low:+.4f}, {high:+.4f}], sign-flip permutation "
                  f"p = {result['p_value']:.4g} ({result['p_method']}, {result['images']} images): {result['verdict']}\n"
                  f"images where B scores higher: {result['B_better_images']}, lower: {result['A_better_images']}")
        return 0
    scores, _, used = score_captions(references, {i: predictions[i] for i in references}, meteor=not args.no_meteor,
                                     spice=args.spice, tokenizer=args.tokenizer)
    if args.json:
        print(json.dumps({**scores, "tokenizer": used}))
    else:
        print(f"{len(references)} images scored; tokenizer: {TOKENIZERS[used]}")
        for name, value in scores.items():
            print(f"{name:8s} {'unavailable' if value is None else f'{value:.4f}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

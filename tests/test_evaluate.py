"""The evaluation command gives exactly pycocoevalcap's numbers."""
import json

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

import pytest

from conftest import SAMPLE, run_module
from src.base.data import load_split, with_captions
from src.base.evaluate import score_captions

ANNOTATIONS = SAMPLE / "annotations" / "val.json"


def _predictions(tmp_path):
    """Captions of the real sample, shifted by one image, plus one exact copy and some punctuation."""
    records = with_captions(load_split(SAMPLE, "val"))
    captions = [r.captions[0] for r in records]
    shifted = captions[1:] + captions[:1]
    shifted[0] = captions[0]  # one perfect caption
    shifted[2] = "A BOTTLE, of pills -- on a table!"
    predictions = [{"image_id": r.image_id, "caption": c} for r, c in zip(records, shifted)]
    path = tmp_path / "predictions.json"
    path.write_text(json.dumps(predictions))
    return path, {r.image_id: r.captions for r in records}, {p["image_id"]: p["caption"] for p in predictions}


def _direct_pycocoevalcap(references, predictions):
    """What COCOEvalCap.evaluate does (without SPICE, which needs a download)."""
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in caps] for i, caps in references.items()})
    res = tokenizer.tokenize({i: [{"caption": predictions[i]}] for i in references})
    scores = {}
    for scorer, names in [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]), (Meteor(), "METEOR"),
                          (Rouge(), "ROUGE_L"), (Cider(), "CIDEr")]:
        score, _ = scorer.compute_score(gts, res)
        if isinstance(names, list):
            scores.update(zip(names, score))
        else:
            scores[names] = score
    return scores


def test_cli_agrees_exactly_with_pycocoevalcap(tmp_path):
    path, references, predictions = _predictions(tmp_path)
    result = run_module("src.base.evaluate", "--annotations", ANNOTATIONS, "--predictions", path, "--json")
    ours = json.loads(result.stdout.strip().splitlines()[-1])
    direct = _direct_pycocoevalcap(references, predictions)
    assert ours.pop("tokenizer") == "ptb"
    assert set(ours) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    for name, value in direct.items():
        assert ours[name] == float(value), name
    assert 0 < ours["CIDEr"] < 10


def test_cli_reports_missing_predictions_in_one_line(tmp_path):
    path, _, _ = _predictions(tmp_path)
    entries = json.loads(path.read_text())[1:]
    path.write_text(json.dumps(entries))
    result = run_module("src.base.evaluate", "--annotations", ANNOTATIONS, "--predictions", path, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "no caption for 1 of 10 scored images" in result.stderr and str(path) in result.stderr


def test_cli_rejects_a_malformed_predictions_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"image_id": "23431", "caption": "x"}]))
    result = run_module("src.base.evaluate", "--annotations", ANNOTATIONS, "--predictions", path, check=False)
    assert result.returncode == 2 and "entry 0" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------- without Java

TRICKY = ["A t-shirt with a dog's face.", "I can't tell; it's dark!", "Don't know what this is...",
          "A 3.5 oz bottle costs $5 (or 50%).", "and/or a U.S. flag, Mr. Smith's hat", 'the label says "Organic" -- maybe',
          "He'd've said 'hello' to the dogs' owner.", "A box of cereal: Honey-Nut Cheerios.", "1,000 pieces & more #1",
          "It's a can of Coca-Cola.", "it’s a “Coca-Cola” can", "a bottle—maybe shampoo", "The screen reads 'Error 404'.",
          "A white box, which says: \"Fragile\"!", "a red & white can (soda)", "the number is 555-1234",
          "a bag of M&M's", "  leading and   double spaces ", "a bottle of tylenol extra-strength 500mg", "cannot see it"]


def _all_captions(*annotation_files):
    return [a["caption"] for f in annotation_files for a in json.loads(f.read_text()).get("annotations", [])]


def test_python_tokenizer_agrees_with_the_ptb_tokenizer(demo_data):
    from src.base.ptb import python_tokenize, tokenize
    captions = _all_captions(*sorted((demo_data / "annotations").glob("*.json")), ANNOTATIONS) + TRICKY
    java = tokenize({i: [c] for i, c in enumerate(captions)}, use_java=True)
    same = sum(python_tokenize(c) == java[i][0] for i, c in enumerate(captions))
    print(f"identical tokenisation: {same} of {len(captions)} captions ({same / len(captions):.2%})")
    assert same / len(captions) >= 0.99
    real_and_tricky = _all_captions(ANNOTATIONS) + TRICKY  # every real sample caption and each listed case
    offset = len(captions) - len(real_and_tricky)
    assert [python_tokenize(c) for c in real_and_tricky] == [java[offset + i][0] for i in range(len(real_and_tricky))]


@pytest.mark.parametrize("where", ["sample", "synthetic"])
def test_corpus_cider_without_java_is_within_half_a_percent(where, demo_data, tmp_path):
    if where == "sample":
        _, references, predictions = _predictions(tmp_path)
    else:
        records = with_captions(load_split(demo_data, "val"))
        references = {r.image_id: r.captions for r in records}
        shifted = records[1:] + records[:1]  # another image's caption: partly right, partly wrong
        predictions = {r.image_id: s.captions[-1] for r, s in zip(records, shifted)}
    java, _, used_java = score_captions(references, predictions, meteor=False, tokenizer="ptb")
    python, _, used_python = score_captions(references, predictions, meteor=False, tokenizer="python")
    assert (used_java, used_python) == ("ptb", "python")
    difference = abs(python["CIDEr"] - java["CIDEr"]) / java["CIDEr"]
    print(f"{where}: CIDEr-D {java['CIDEr']:.4f} (PTB) vs {python['CIDEr']:.4f} (Python), {difference:.3%} apart")
    assert difference < 0.005


def test_without_java_meteor_and_spice_are_unavailable_not_zero(tmp_path, monkeypatch):
    import src.base.evaluate as evaluate
    monkeypatch.setattr(evaluate, "java_available", lambda: False)
    path, references, predictions = _predictions(tmp_path)
    scores, _, used = evaluate.score_captions(references, predictions, meteor=True, spice=True)
    assert used == "python" and scores["METEOR"] is None and scores["SPICE"] is None and scores["CIDEr"] > 0


def test_cli_says_which_tokenizer_and_reports_meteor_unavailable(tmp_path):
    path, _, _ = _predictions(tmp_path)
    result = run_module("src.base.evaluate", "--annotations", ANNOTATIONS, "--predictions", path, "--tokenizer", "python")
    assert "tokenizer: PTB-like tokenizer in Python (spaCy), no Java" in result.stdout
    assert "METEOR   unavailable" in result.stdout


# ---------------------------------------------------------------- submission check

def _test_annotations(tmp_path):
    path = tmp_path / "annotations" / "test.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"images": [{"id": i, "file_name": f"{i}.jpg"} for i in (10, 11, 12)]}))
    return path


GOOD = [{"image_id": 10, "caption": "a can"}, {"image_id": 11, "caption": "a dog"}, {"image_id": 12, "caption": "a cup"}]


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not valid JSON"),
    (json.dumps({"image_id": 10, "caption": "x"}), "top level must be a JSON list"),
    (json.dumps([{"image_id": "10", "caption": "a can"}] + GOOD[1:]), "image_id must be an integer, got '10'"),
    (json.dumps([{"image_id": True, "caption": "a can"}] + GOOD[1:]), "image_id must be an integer, got True"),
    (json.dumps(GOOD + [{"image_id": 99, "caption": "x"}]), "image_id 99 is not an image of"),
    (json.dumps(GOOD + [GOOD[0]]), "image_id 10 appears more than once"),
    (json.dumps([{"image_id": 10, "caption": "  "}] + GOOD[1:]), "caption must be a non-empty string"),
    (json.dumps([{"image_id": 10, "caption": None}] + GOOD[1:]), "caption must be a non-empty string"),
    (json.dumps(GOOD[:2]), "1 of 3 images have no caption (first: [12])"),
    (json.dumps([{**GOOD[0], "score": 1}] + GOOD[1:]), "unexpected keys ['score']"),
    (json.dumps(["a can"] + GOOD[1:]), "entry 0: not an object"),
])
def test_submission_check_names_each_defect(tmp_path, content, problem):
    from src.base.evaluate import check_submission
    submission = tmp_path / "captions.json"
    submission.write_text(content)
    problems = check_submission(submission, _test_annotations(tmp_path))
    assert any(problem in p for p in problems), problems


def test_submission_check_passes_a_good_file_from_the_command_line(tmp_path):
    submission = tmp_path / "captions.json"
    submission.write_text(json.dumps(GOOD))
    annotations = _test_annotations(tmp_path)
    result = run_module("src.base.evaluate", "--check-submission", submission, "--annotations", annotations)
    assert "ready for the challenge server (0 problems)" in result.stdout
    submission.write_text(json.dumps(GOOD[:2]))
    result = run_module("src.base.evaluate", "--check-submission", submission, "--annotations", annotations, check=False)
    assert result.returncode == 1 and "NOT ready" in result.stdout


# ---------------------------------------------------------------- comparing two runs

def test_bootstrap_interval_contains_zero_for_a_file_against_itself(tmp_path):
    from src.base.evaluate import compare
    _, references, predictions = _predictions(tmp_path)
    result = compare(references, predictions, predictions, "python")
    assert result["difference"] == 0 and result["ci95"][0] <= 0 <= result["ci95"][1]


def test_bootstrap_interval_excludes_zero_for_a_clearly_better_file(demo_data):
    from src.base.evaluate import compare
    records = with_captions(load_split(demo_data, "val"))
    references = {r.image_id: r.captions for r in records}
    poor = {r.image_id: "a picture of something" for r in records}
    good = {r.image_id: r.captions[0] for r in records}
    result = compare(references, poor, good, "python")
    assert result["ci95"][0] > 0 and result["B_better_images"] > result["A_better_images"]
    worse = compare(references, good, poor, "python")
    assert worse["ci95"][1] < 0


def test_spice_that_cannot_get_its_models_is_reported_and_the_rest_goes_on(tmp_path, monkeypatch):
    import urllib.error

    import src.base.evaluate as evaluate

    def no_download():
        raise urllib.error.URLError("Name or service not known")  # what SPICE's CoreNLP download meets offline

    warnings = []
    monkeypatch.setattr(evaluate, "_spice", no_download)
    monkeypatch.setattr(evaluate.log, "warning", warnings.append)
    _, references, predictions = _predictions(tmp_path)
    scores, _, _ = evaluate.score_captions(references, predictions, meteor=False, spice=True, tokenizer="ptb")
    assert scores["SPICE"] is None and scores["CIDEr"] > 0
    assert len(warnings) == 1 and warnings[0].startswith("SPICE unavailable (<urlopen error Name or service not known>)")

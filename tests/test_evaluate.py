"""The evaluation command gives exactly pycocoevalcap's numbers."""
import json

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from conftest import SAMPLE, run_module
from src.base.data import load_split, with_captions

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

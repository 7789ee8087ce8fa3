"""Consensus decoding (test --mbr N) and ensembles of runs (scripts/ensemble.py): the caption written is the candidate
with the highest mean CIDEr-D against the others (document frequencies of the training captions, as the SCST
reward); every test run writes <split>_candidates.json, which ensembles of runs of any family pool."""
import json
import shutil

import pytest

from conftest import FAST, run_module
from src.base import consensus, decoding
from src.base.checkpoint import weights_fingerprint
from src.base.cider import CiderD, ngram_counts
from src.base.config import RunConfig, defaults
from src.base.data import load_split, with_captions
from src.base.evaluate import check_submission, read_predictions
from src.base.families import apply_recipe
from src.ft.method import METHOD as FT

# Training references that share no word with the candidates below: every n-gram of theirs then has the same
# document frequency (0, counted as 1), so its tf-idf weight is the same and CIDEr-D reduces to counting. For two
# 3-word captions of distinct words, the CIDEr-D of one against the other is 10/4 x (shared words / 3 + shared
# bigrams / 2 + shared trigrams / 1) (4-grams: none; equal lengths: no length penalty).
UNRELATED_TRAINING = {1: ["u v"], 2: ["w x"]}


def test_consensus_is_the_hand_computed_mean_cider_d_against_the_other_candidates():
    cider = CiderD(UNRELATED_TRAINING)
    candidates = ["a b c", "a b d", "e b d", "a f g"]
    # pairs: (0,1) 2/3 + 1/2; (0,2) 1/3; (0,3) 1/3; (1,2) 2/3 + 1/2; (1,3) 1/3; (2,3) 0; mean over the 3 others
    expected = [2.5 * (7 / 6 + 1 / 3 + 1 / 3) / 3, 2.5 * (7 / 6 + 7 / 6 + 1 / 3) / 3, 2.5 * (1 / 3 + 7 / 6) / 3,
                2.5 * (1 / 3 + 1 / 3) / 3]
    assert cider.consensus(candidates) == pytest.approx(expected, abs=1e-9)
    chosen, _ = consensus.choose(cider, [{"caption": c} for c in candidates])
    assert chosen == 1  # "a b d": not the first candidate, nor the one sharing most words with the first
    # the same as the SCST reward's CIDEr-D of each candidate with the others as its references
    for i, candidate in enumerate(candidates):
        cider.references["others"] = [cider._vector(ngram_counts(c)) for j, c in enumerate(candidates) if j != i]
        assert cider.score("others", candidate) == pytest.approx(expected[i], abs=1e-9)


def test_ensemble_consensus_counts_the_other_runs_each_alike():
    """Run A drew its caption three times, runs B and C agree on another: pooled, A's copies back each other up and
    win; counting agreement with the other runs only, each run alike (as scripts/ensemble.py does), the caption of
    two runs out of three wins."""
    cider = CiderD(UNRELATED_TRAINING)
    candidates, runs = ["p q r"] * 3 + ["p q s"] * 2, ["A", "A", "A", "B", "C"]
    same, near = 3.0, 2 / 3 + 1 / 2  # raw sums over orders: identical captions; "p q r" against "p q s"
    assert cider.consensus(candidates) == pytest.approx([2.5 * (2 * same + 2 * near) / 4] * 3 +
                                                        [2.5 * (3 * near + same) / 4] * 2)
    assert cider.consensus(candidates, runs) == pytest.approx([2.5 * near] * 3 + [2.5 * (near + same) / 2] * 2)
    assert consensus.choose(cider, [{"caption": c} for c in candidates])[0] == 0
    assert consensus.choose(cider, [{"caption": c} for c in candidates], runs)[0] == 3


@pytest.fixture(scope="module")
def demo_cider(demo_data):
    return consensus.training_cider(demo_data)


@pytest.fixture(scope="module")
def two_families(ft_run, tiny_git, demo_data, tmp_path_factory):
    """A BLIP run (ft_run's model, beam search: its 3-best) and a GIT one (the tiny GIT with --mbr 4 over 2 beams and
    2 samples), each captioning the test split into an output directory of its own (the validation split's path
    differs only in scoring, which the demo runs)."""
    root = tmp_path_factory.mktemp("ensemble")
    for out, checkpoint, extra in [(root / "blip", ft_run / "best_model", ["--num-beams", "3"]),
                                   (root / "git", tiny_git, ["--num-beams", "2", "--mbr", "4", "--max-new-tokens", "8"])]:
        run_module("src.ft.test", "--output-dir", out, "--checkpoint", checkpoint, "--data-dir", demo_data, *FAST,
                   *extra)
    return root / "blip", root / "git"


def test_mbr_writes_the_consensus_of_beams_and_samples_and_every_candidate(two_families, ft_run, demo_data,
                                                                          demo_cider, tmp_path):
    beams, plain = 3, two_families[0]
    records = load_split(demo_data, "test")
    plain_images = json.loads((plain / "test_candidates.json").read_text())["images"]
    # plain beam search: its n-best, the top beam written (as before), no consensus computed
    assert [image["image_id"] for image in plain_images] == [r.image_id for r in records]
    assert all([c["source"] for c in image["candidates"]] == ["beam"] * beams and "consensus" not in
               image["candidates"][0] and image["caption"] == image["candidates"][0]["caption"] for image in plain_images)
    assert read_predictions(plain / "test_captions.json") == {i["image_id"]: i["caption"] for i in plain_images}

    out = tmp_path / "mbr"
    result = run_module("src.ft.test", "--output-dir", out, "--checkpoint", ft_run / "best_model", "--data-dir",
                        demo_data, *FAST, "--num-beams", str(beams), "--mbr", "6")
    written = json.loads((out / "test_candidates.json").read_text())
    assert written["split"] == "test" and written["decoding"]["mbr"] == 6
    assert written["chosen_by"] == "consensus, among the beams"
    for image, before in zip(written["images"], plain_images):
        candidates = image["candidates"]
        assert [c["source"] for c in candidates] == ["beam"] * beams + ["sample"] * 3
        assert [c["caption"] for c in candidates[:beams]] == [c["caption"] for c in before["candidates"]]
        recomputed = demo_cider.consensus([consensus._tokens(c["caption"]) for c in candidates])
        assert [c["consensus"] for c in candidates] == pytest.approx(recomputed, abs=1e-5)
        # written: the beam the beams and samples back most (samples vote, MBR_CHOOSE_FROM=beams)
        assert image["caption"] == candidates[recomputed.index(max(recomputed[:beams]))]["caption"]
    assert read_predictions(out / "test_captions.json") == {i["image_id"]: i["caption"] for i in written["images"]}
    assert consensus.changed(written["images"]) > 0  # consensus did not merely keep the top beam
    assert f"another caption than the top beam for {consensus.changed(written['images'])} of {len(records)}" \
        in result.stdout


def _recipe_config(checkpoint):
    """A run configuration with the checkpoint family's recipe filled in, as a test run has it."""
    config = RunConfig(**defaults(FT))
    apply_recipe(config, FT, str(checkpoint))
    return config


def test_tune_decoding_tries_consensus_on_the_best_setting_and_decoding_json_carries_it(tiny_blip, tmp_path):
    config = _recipe_config(tiny_blip)
    tried = []

    def caption(config):
        tried.append(decoding.current(config))
        return dict(tried[-1])

    def score(settings):  # longer captions and consensus score higher
        return settings["max_new_tokens"] + 5 * bool(settings["mbr"]) + settings["num_beams"] / 10

    rows = decoding.tune(caption, score, config, mbr=7)
    run_setting_added = decoding.current(_recipe_config(tiny_blip)) not in decoding.grid()  # the grid and the run's own
    assert len(tried) == len(decoding.grid()) + run_setting_added + 1 and not any(s["mbr"] for s in tried[:-1])
    assert rows[0] == {**tried[-1], "tuning_CIDEr": score(tried[-1])}
    assert tried[-1] == {**max(tried[:-1], key=score), "mbr": 7}
    tuned = decoding.save(tmp_path, weights_fingerprint(tiny_blip)[0], str(tiny_blip), "ptb", rows,
                          decoding.current(_recipe_config(tiny_blip)), [], [], {"best": 1.0, "run_setting": 0.5})
    assert "| MBR candidates |" in decoding.report(tuned)[0] and "consensus of 7 candidates" in decoding.report(tuned)[1]

    later = _recipe_config(tiny_blip)
    decoding.apply_saved(later, tmp_path, set(), str(tiny_blip))
    assert later.mbr == 7 and later.max_new_tokens == tried[-1]["max_new_tokens"]
    flagged = _recipe_config(tiny_blip)
    decoding.apply_saved(flagged, tmp_path, {"mbr"}, str(tiny_blip))  # --mbr 0 given: beam search
    assert flagged.mbr == 0 and flagged.max_new_tokens == tried[-1]["max_new_tokens"]
    # a decoding.json from before --mbr existed: beam search
    old = json.loads((tmp_path / "decoding.json").read_text())
    del old["best"]["mbr"]
    (tmp_path / "decoding.json").write_text(json.dumps(old))
    older = RunConfig(**defaults(FT), mbr=3)
    decoding.apply_saved(older, tmp_path, set(), str(tiny_blip))
    assert older.mbr == 0


def test_ensemble_of_a_blip_and_a_git_run_picks_by_consensus_over_their_pool(two_families, demo_data, demo_cider,
                                                                             tmp_path):
    blip, git = two_families
    out = tmp_path / "ensemble"
    result = run_module("scripts.ensemble", blip, git, "--output-dir", out)  # the test split, by default
    pooled = json.loads((out / "test_candidates.json").read_text())
    assert [image["image_id"] for image in pooled["images"]] == [r.image_id for r in load_split(demo_data, "test")]
    for image in pooled["images"]:
        candidates = image["candidates"]
        assert [c["run"] for c in candidates] == [str(blip)] * 3 + [str(git)] * 4
        scores = demo_cider.consensus([consensus._tokens(c["caption"]) for c in candidates], [c["run"] for c in candidates])
        beams = [score for score, c in zip(scores, candidates) if c["source"] == "beam"]  # GIT's 2 samples only vote
        assert image["caption"] == candidates[scores.index(max(beams))]["caption"]
    # the challenge file: the format test writes, and the submission check passes it
    assert read_predictions(out / "test_captions.json") == {i["image_id"]: i["caption"] for i in pooled["images"]}
    assert check_submission(out / "test_captions.json", demo_data / "annotations" / "test.json") == []
    assert f"captions taken from (a caption several runs wrote counts for the first): {blip} " in result.stdout


def test_ensemble_says_in_one_line_which_candidates_file_is_missing_or_of_other_images(two_families, tmp_path):
    blip, git = two_families

    def refused(*runs, split="test"):
        result = run_module("scripts.ensemble", *runs, "--split", split, "--output-dir", tmp_path / "out", check=False)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        return result.stderr

    assert f"{tmp_path / 'empty' / 'test_candidates.json'}: no candidates file" in refused(blip, tmp_path / "empty")
    other_split = shutil.copytree(git, tmp_path / "other_split")
    content = json.loads((other_split / "test_candidates.json").read_text())
    (other_split / "val_candidates.json").write_text(json.dumps({**content, "split": "test"}))
    assert "candidates of the test split, not of val" in refused(other_split, blip, split="val")
    fewer = shutil.copytree(git, tmp_path / "fewer")
    dropped = content["images"].pop()["image_id"]
    (fewer / "test_candidates.json").write_text(json.dumps(content))
    line = refused(blip, fewer)
    assert "made on another image set than" in line and f"(first: {dropped})" in line
    assert not (tmp_path / "out" / "test_captions.json").exists()


def test_mbr_without_the_training_annotations_stops_in_one_line_before_captioning(ft_run, demo_data, tmp_path):
    data = tmp_path / "data"
    (data / "annotations").mkdir(parents=True)
    shutil.copy(demo_data / "annotations" / "val.json", data / "annotations" / "val.json")
    (data / "val").symlink_to(demo_data / "val")
    result = run_module("src.ft.test", "--output-dir", tmp_path / "out", "--checkpoint", ft_run / "best_model",
                        "--data-dir", data, "--split", "val", *FAST, "--mbr", "4", check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"{data / 'annotations' / 'train.json'}: not found" in result.stderr and "val images with" not in result.stdout
    assert not (tmp_path / "out" / "val_captions.json").exists()

"""Decoding chosen on validation: `test --split val --tune-decoding` chooses a setting on part of the validation
images, scores the choice on the others, and writes decoding.json with the fingerprint of the weights it was tuned
on; later `test` runs of the same weights use it, flags still override it, and other weights ignore it."""
import json
import shutil

import pytest
import torch

from conftest import FAST, REPO, run_module
from src.base import decoding
from src.base.checkpoint import weights_fingerprint
from src.base.data import load_split, with_captions
from src.base.evaluate import score_captions

# the run's own decoding in the tuned run: captions cut to 3 tokens, so a grid setting wins
CUT = ["--num-beams", "1", "--min-new-tokens", "0", "--max-new-tokens", "3", "--length-penalty", "1.0",
       "--repetition-penalty", "1.0"]


@pytest.fixture(scope="module")
def tuned_run(ft_run, tmp_path_factory):
    """(directory, output of --tune-decoding): a copy of ft_run whose decoding was tuned from the CUT setting."""
    run = tmp_path_factory.mktemp("tuned") / "run"
    shutil.copytree(ft_run, run, ignore=shutil.ignore_patterns("*_captions.json", "val_scores.json", "decoding.json"))
    result = run_module("src.ft.test", "--output-dir", run, "--split", "val", "--tune-decoding", "--num-workers", "0",
                        *CUT)
    return run, result


def copy_of(tuned_run, tmp_path):
    shutil.copytree(tuned_run[0], tmp_path / "run")
    return tmp_path / "run"


def run_test(run, *args):
    return run_module("src.ft.test", "--output-dir", run, "--num-workers", "0", *args)


def ignored_line(result):
    """The one line saying decoding.json is ignored (and no line saying it is used)."""
    assert "decoding from" not in result.stdout
    lines = [line for line in result.stdout.splitlines() if "decoding.json ignored" in line]
    assert len(lines) == 1, result.stdout
    return lines[0]


def cider_on(image_ids, captions_file, references):
    predictions = {c["image_id"]: c["caption"] for c in json.loads(captions_file.read_text())}
    scores, _, _ = score_captions({i: references[i] for i in image_ids}, {i: predictions[i] for i in image_ids},
                                  meteor=False)
    return scores["CIDEr"]


def test_grid_is_small_and_has_no_duplicates():
    settings = decoding.grid()
    assert len(settings) <= 20
    assert len({tuple(sorted(s.items())) for s in settings}) == len(settings)
    assert {s["num_beams"] for s in settings} == {1, 3, 5}


def test_decoding_is_chosen_on_some_validation_images_and_scored_on_the_others(tuned_run, demo_data, tmp_path):
    run, result = copy_of(tuned_run, tmp_path), tuned_run[1]
    tuned = json.loads((run / "decoding.json").read_text())
    rows = tuned["settings"]
    assert len(rows) == len(decoding.grid()) + 1 and tuned["run_setting"]["max_new_tokens"] == 3
    assert rows == sorted(rows, key=lambda r: -r["tuning_CIDEr"]) and tuned["best"] == decoding.setting(rows[0])
    assert tuned["best"]["max_new_tokens"] >= 20, tuned["best"]
    own = next(r for r in rows if r["max_new_tokens"] == 3)
    assert rows[0]["tuning_CIDEr"] > own["tuning_CIDEr"] + 0.3

    # the choice is scored on validation images it was not chosen on
    references = {r.image_id: r.captions for r in with_captions(load_split(demo_data, "val"))}
    tuning, held_out = set(tuned["tuning_images"]), set(tuned["held_out_images"])
    assert not tuning & held_out and tuning | held_out == set(references)
    assert len(held_out) == round(len(references) * decoding.HELD_OUT_FRACTION)
    assert result.stdout.count("| beams |") == 1  # the table, once, labelled
    assert f"| tuning CIDEr-D ({len(tuning)} images) | held-out CIDEr-D ({len(held_out)} images) |" in result.stdout
    assert "| chosen |" in result.stdout and "| run's |" in result.stdout
    assert f"Held-out CIDEr-D (the {len(held_out)} validation images not used to choose): " \
           f"{tuned['held_out_CIDEr']['best']:.4f}, the run's own setting " \
           f"{tuned['held_out_CIDEr']['run_setting']:.4f}" in result.stdout

    # a later test run uses the best setting and says so; its captions score on each part what decoding.json says
    # (so each number was computed on its own images)
    later = run_test(run, "--split", "val")
    assert "decoding from" in later.stdout and "decoding.json" in later.stdout
    captions = run / "val_captions.json"
    assert cider_on(held_out, captions, references) == pytest.approx(tuned["held_out_CIDEr"]["best"], abs=1e-9)
    assert cider_on(tuning, captions, references) == pytest.approx(rows[0]["tuning_CIDEr"], abs=1e-9)
    run_test(run)  # the test split too
    assert min(len(c["caption"].split()) for c in json.loads((run / "test_captions.json").read_text())) > 3
    # flags override it: the run's own setting, whose held-out score decoding.json holds too
    run_test(run, "--split", "val", *CUT)
    assert cider_on(held_out, captions, references) == pytest.approx(tuned["held_out_CIDEr"]["run_setting"], abs=1e-9)


def test_held_out_images_do_not_depend_on_the_order_of_the_file(demo_data):
    records = with_captions(load_split(demo_data, "val"))
    held_out = {r.image_id for r in decoding.split_held_out(records)[1]}
    assert held_out == {r.image_id for r in decoding.split_held_out(records[::-1])[1]}


def test_train_fresh_removes_tuned_decoding_and_the_retrained_model_ignores_the_old_one(tuned_run, tiny_blip, demo_data,
                                                                                        tmp_path):
    run = copy_of(tuned_run, tmp_path)
    old = (run / "decoding.json").read_text()
    outputs = ["val_captions.json", "val_scores.json", "test_captions.json"]
    for name in outputs:  # what test wrote with the old model
        (run / name).write_text("[]")
    run_module("src.ft.train", "--data-dir", demo_data, "--checkpoint", tiny_blip, "--output-dir", run, "--fresh",
               *FAST, "--max-steps", "2", "--eval-every", "2", "--no-eval-at-start", "--val-max-images", "4")
    assert not [name for name in ["decoding.json", *outputs] if (run / name).exists()]

    # a decoding.json tuned on the old weights (say, copied back) is not applied to the new best_model/, same path
    (run / "decoding.json").write_text(old)
    result = run_test(run)
    line = ignored_line(result)
    assert "other weights" in line and "tune again" in line
    assert "(beams 1, new tokens 0-20, length penalty 1.0, repetition penalty 1.0" in result.stdout  # FAST's


def test_tuned_decoding_follows_the_weights_not_the_path(tuned_run, tiny_blip, tmp_path):
    run = copy_of(tuned_run, tmp_path)
    elsewhere = shutil.copytree(run / "best_model", tmp_path / "copied_model")
    assert "decoding from" in run_test(run, "--checkpoint", elsewhere).stdout  # the same weights
    assert "other weights" in ignored_line(run_test(run, "--checkpoint", tiny_blip))


def test_decoding_file_without_a_fingerprint_is_ignored(tuned_run, tmp_path):
    run = copy_of(tuned_run, tmp_path)
    tuned = json.loads((run / "decoding.json").read_text())
    tuned.pop("model_fingerprint", None)  # as older versions wrote it
    (run / "decoding.json").write_text(json.dumps(tuned))
    assert "tune again" in ignored_line(run_test(run))


def test_fingerprint_is_of_the_weight_files_contents(tiny_blip, tmp_path, monkeypatch):
    import huggingface_hub
    fingerprint, why = weights_fingerprint(tiny_blip)
    assert fingerprint and why is None
    copy = shutil.copytree(tiny_blip, tmp_path / "copy")
    assert weights_fingerprint(copy) == (fingerprint, None)
    # a hub name: its files in the local Hugging Face cache, offline
    repo = tmp_path / "hub" / "models--someone--tiny-blip"
    shutil.copytree(tiny_blip, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert weights_fingerprint("someone/tiny-blip") == (fingerprint, None)
    missing, why = weights_fingerprint("someone/not-downloaded")
    assert missing is None and why
    # a LoRA adapter: its weights and its base checkpoint's
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"adapter weights")
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(copy)}))
    over_copy = weights_fingerprint(adapter)[0]
    assert over_copy not in (None, fingerprint)
    with open(copy / "model.safetensors", "r+b") as f:  # one byte of the base's weights changes
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert weights_fingerprint(copy)[0] != fingerprint and weights_fingerprint(adapter)[0] != over_copy


def test_tune_decoding_needs_the_validation_split(ft_run):
    result = run_module("src.ft.test", "--output-dir", ft_run, "--tune-decoding", check=False)
    assert result.returncode == 2 and "--split val" in result.stderr and result.stderr.count("\n") == 1


def test_tune_decoding_needs_two_validation_images_to_hold_one_out(ft_run, demo_data, tmp_path):
    result = run_module("src.ft.test", "--output-dir", tmp_path, "--checkpoint", ft_run / "best_model", "--data-dir",
                        demo_data, "--split", "val", "--tune-decoding", "--val-max-images", "1", *FAST, check=False)
    assert result.returncode == 2 and "--val-max-images" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "decoding.json").exists()


def test_captions_cut_short_by_the_length_cap_are_counted_in_the_log(ft_run, demo_data, tmp_path):
    """A caption that reaches --max-new-tokens before its end token is cut mid-sentence: the log counts them, so a
    cap too short for the data (VizWiz's references are longer than COCO's) shows in the first validation."""
    from src.base.families import load_family
    family = load_family(str(ft_run / "best_model"), "a picture of")
    prefix, end, word = family.prefix, family.end_id, family.word_ids(["box"])[0][0]
    rows = torch.tensor([prefix + [word, end, family.pad_id], prefix + [word, word, word], prefix + [end, word, word]])
    assert family.cut_short(rows) == [False, True, False]
    longer = [prefix[0], word] + prefix[1:]  # an image with one OCR word in its prefix
    # the real BLIP-base tokenizer and configuration (no [DEC] in its vocabulary: the start token is the config's)
    real = load_family(str(REPO / "tests" / "fixtures" / "hub_files" / "blip-image-captioning-base"), "a picture of")
    words = real.word_ids(["a bottle of shampoo, held in a hand."])[0]
    ended = real.prefix + words + [real.end_id] + [real.pad_id] * (len(words) - 1)
    full = torch.tensor([ended, real.prefix + words * 2])
    assert real.cut_short(full) == [False, True] and real.decode(full[:1]) == ["a bottle of shampoo, held in a hand."]
    assert family.cut_short(torch.tensor([longer + [word, end]]), torch.tensor([len(longer)])) == [False]
    for cap in (2, 20):
        run_module("src.ft.test", "--output-dir", tmp_path / str(cap), "--checkpoint", ft_run / "best_model",
                   "--data-dir", demo_data, "--split", "val", *FAST, "--max-new-tokens", str(cap))
    captions = json.loads((tmp_path / "20" / "val_captions.json").read_text())
    images = len(with_captions(load_split(demo_data, "val")))
    cut = f"{images} of {images} captions reached --max-new-tokens 2 before their end token"
    assert cut in (tmp_path / "2" / "test.log").read_text()
    assert "reached --max-new-tokens" not in (tmp_path / "20" / "test.log").read_text()  # measured: none at 20
    assert max(len(c["caption"].split()) for c in captions) < 20

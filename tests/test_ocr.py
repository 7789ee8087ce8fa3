"""OCR-aware captioning (--ocr, scripts/ocr.py, docs/ocr.md): the engine reads printed words, they go into each
image's prefix, are never trained on or written, and a batch of mixed prefixes captions as images one by one do."""
import json

import pytest
import torch

from conftest import FAST, run_module, sharp_family_model


def test_ocr_script_reads_printed_words_in_shards_and_resumes(tmp_path):
    """The real engine on words rendered with PIL: shard 1 of 2 alone writes no OCR file, shard 2 then merges both
    parts; an image a partial file already holds is not read again (its entry is kept as it was)."""
    from scripts.ocr import main as ocr_main, part_path
    from scripts.synthetic_sets import BRANDS, make_set
    from src.base.data import load_split
    from src.base.ocr import load_ocr, ocr_path, words
    data = make_set("labels", tmp_path / "labels", train=1, val=4, test=1, seed=5)
    records = load_split(data, "val")
    kept = {"text": "ALREADY READ", "confidence": 0.9, "box": [[0, 0], [9, 0], [9, 5], [0, 5]]}
    part = part_path(data, "val", 2, 2)
    part.parent.mkdir(parents=True)
    part.write_text(json.dumps({"complete": False, "images": {str(records[1].image_id): [kept]}}))

    assert ocr_main(["--data-dir", str(data), "--splits", "val", "--shard", "1/2", "--processes", "1"]) == 0
    assert not ocr_path(data, "val").exists()
    assert ocr_main(["--data-dir", str(data), "--splits", "val", "--shard", "2/2", "--processes", "1"]) == 0
    read = load_ocr(data, "val")
    assert set(read) == {r.image_id for r in records} and not part.exists()
    assert read[records[1].image_id] == [kept]
    printed = [next((w for w in BRANDS if w in r.captions[0]), None) for r in records]
    checked = [(r, w) for r, w in zip(records, printed) if w and r is not records[1]]
    assert checked, "the generator printed no word on these images: change the seed"
    for record, word in checked:
        assert word in words(read[record.image_id], 0.5)


def test_words_keep_confident_boxes_largest_first_once():
    from src.base.ocr import words

    def box(text, confidence, height):
        return {"text": text, "confidence": confidence, "box": [[0, 0], [50, 0], [50, height], [0, height]]}
    boxes = [box("net wt 12oz", 0.99, 10), box("Corn FLAKES!", 0.95, 40), box("blurry", 0.3, 60),
             box("corn", 0.9, 20), box("a", 0.99, 30)]
    assert words(boxes, 0.5) == ["corn", "flakes", "net", "wt", "12oz"]


def test_ocr_words_are_in_the_prefix_and_out_of_the_loss(tiny_blip2):
    """BPE tokens (BLIP-2's OPT): an image's OCR tokens sit between the start token and the prompt, whole words up
    to the token limit, and the labels leave them (and the prompt) out: only the caption and the end token count."""
    from src.base.data import CaptionCollator
    from src.base.families import load_family
    family = load_family(tiny_blip2, prompt="a photo of")
    with_text = family.prefix_ids(["red", "circle"], max_tokens=40)
    ocr = family.word_ids([" red", " circle"])
    assert with_text == family.start_ids() + ocr[0] + ocr[1] + family.prefix[1:]
    assert family.prefix_ids(["red", "circle"], max_tokens=len(ocr[0])) == family.start_ids() + ocr[0] + family.prefix[1:]
    assert family.prefix_ids([], max_tokens=40) == family.prefix
    samples = [{"pixel_values": torch.zeros(3, 4, 4), "image_id": i, "prefix": prefix,
                "captions": family.training_sequences(["a blue square", "a square"], 40, prefix)}
               for i, prefix in enumerate([with_text, family.prefix])]
    batch = CaptionCollator(family.pad_id, len(family.prefix))(samples)
    for row, (sample, caption) in enumerate([(s, c) for s in samples for c in s["captions"]]):
        labelled = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert labelled == caption[len(sample["prefix"]):]
    assert batch["prefixes"] == [with_text, family.prefix]


@pytest.mark.parametrize("checkpoint", ["tiny_blip", "tiny_git", "tiny_blip2"])
def test_a_batch_of_mixed_prefixes_captions_as_one_by_one(checkpoint, request):
    """generate_from (beam search) and sample_from (greedy, as SCST's baseline) on images whose prefixes differ in
    length give each image the caption it gets alone; the prefixes change the captions (so the test can tell); each
    row's log-probability (SCST) is the one it has alone."""
    family, model = sharp_family_model(request.getfixturevalue(checkpoint))
    vocab = ["red", "circle", "blue", "square", "yellow", "background"]
    prefixes = [family.prefix_ids(words, 12) for words in (vocab[:3], [], vocab[1:6])]
    assert len({len(p) for p in prefixes}) == 3
    torch.manual_seed(0)
    pixels = torch.randn(len(prefixes), 3, family.config.vision_config.image_size, family.config.vision_config.image_size)
    settings = dict(num_beams=2, max_new_tokens=5, min_new_tokens=0)

    batched = family.decode(*family.generate_from(model, pixels, prefixes, **settings))
    alone = [family.decode(*family.generate_from(model, pixels[i:i + 1], [p], **settings))[0]
             for i, p in enumerate(prefixes)]
    assert batched == alone
    plain = family.decode(family.generate(model, pixels, **settings))
    assert [c for c, p in zip(batched, prefixes) if p == family.prefix] == \
        [c for c, p in zip(plain, prefixes) if p == family.prefix]
    assert batched != plain

    features = family.encode_images(model, pixels)
    sequences, lengths = family.sample_from(model, features, prefixes, 1, 5, greedy=True)
    log_probs, counts = family.sequence_log_probs(model, features, sequences, 1.0, lengths, 5)
    for i, prefix in enumerate(prefixes):
        row, row_lengths = family.sample_from(model, features[i:i + 1], [prefix], 1, 5, greedy=True)
        assert row[0].tolist() == sequences[i, :row.shape[1]].tolist() and row[0, :len(prefix)].tolist() == prefix
        alone_log_prob, alone_count = family.sequence_log_probs(model, features[i:i + 1], row, 1.0, row_lengths, 5)
        assert counts[i] == alone_count[0]
        assert log_probs[i].item() == pytest.approx(alone_log_prob[0].item(), abs=1e-4)


def test_scst_samples_and_scores_from_each_images_prefix(tiny_blip):
    """SCST's samples and greedy baseline start from each image's own prefix (the batch's "prefixes")."""
    from src.base.data import CaptionCollator, ImageRecord
    from src.base.objectives import SelfCritical
    family, model = sharp_family_model(tiny_blip)
    prefixes = [family.prefix_ids(["red", "circle"], 12), family.prefix, family.prefix_ids(["blue"], 12)]
    samples = [{"pixel_values": torch.randn(3, 32, 32), "image_id": i, "prefix": prefix,
                "captions": family.training_sequences(["a red circle"], 40, prefix)} for i, prefix in enumerate(prefixes)]
    batch = CaptionCollator(family.pad_id, len(family.prefix))(samples)
    started_from, sample = [], family.sample

    def watched_sample(model, features, samples_per_image, *args, **kwargs):
        started_from.append(family.first_tokens(features.shape[0] * samples_per_image, starts=kwargs.get("starts")).tolist())
        return sample(model, features, samples_per_image, *args, **kwargs)
    family.sample = watched_sample
    objective = SelfCritical(family, [ImageRecord(i, None, ["a red circle"]) for i in range(3)], samples=2,
                             baseline="greedy", max_new_tokens=5)
    model.train()
    loss = objective.loss(model, batch)
    assert len(started_from) == 2 * 3  # the samples and the greedy baseline, once per prefix length
    assert {tuple(row) for rows in started_from for row in rows} == {tuple(p) for p in prefixes}
    assert torch.isfinite(loss) and loss.requires_grad


def _write_ocr(data_dir, split, words_by_position):
    from src.base.data import load_split
    records = load_split(data_dir, split)
    images = {str(r.image_id): [{"text": " ".join(words_by_position[n % len(words_by_position)]), "confidence": 0.9,
                                 "box": [[0, 0], [10, 0], [10, 8], [0, 8]]}] if words_by_position[
        n % len(words_by_position)] else [] for n, r in enumerate(records)}
    (data_dir / "ocr").mkdir(exist_ok=True)
    (data_dir / "ocr" / f"{split}.json").write_text(json.dumps({"images": images}))


def test_ocr_run_trains_and_tests_with_its_prefixes(tiny_blip, demo_data, tmp_path):
    """Without D/ocr/<split>.json, --ocr stops with one line naming the command that makes it. With the files, a run
    trains and tests with --ocr saved in its config: its test run needs the test split's OCR file without being
    told."""
    import shutil
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    out = tmp_path / "run"
    train = ["--data-dir", data, "--checkpoint", tiny_blip, "--output-dir", out, *FAST, "--max-steps", "4",
             "--eval-every", "4", "--no-eval-at-start", "--val-max-images", "4", "--ocr"]
    result = run_module("src.ft.train", *train, check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"python scripts/ocr.py --data-dir {data} --splits train" in result.stderr

    for split in ("train", "val"):
        _write_ocr(data, split, [["red", "circle"], [], ["blue"]])
    run_module("src.ft.train", *train)
    assert json.loads((out / "config.json").read_text())["ocr"] is True

    result = run_module("src.ft.test", "--output-dir", out, check=False)
    assert result.returncode == 2 and "--splits test" in result.stderr
    _write_ocr(data, "test", [["yellow", "square", "green"], []])
    run_module("src.ft.test", "--output-dir", out)
    captions = json.loads((out / "test_captions.json").read_text())
    assert len(captions) == 25 and all(c["caption"].strip() for c in captions)

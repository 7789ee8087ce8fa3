"""The image cache (scripts/cache_images.py): bit-identical pixels, used by itself, never when stale or broken."""
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BlipImageProcessor

from conftest import SAMPLE, write_annotations
from scripts.cache_images import build_cache, main as cache_main
from scripts.make_demo_assets import make_dataset
from src.base import constants
from src.base.data import (BadImage, CaptionCollator, CaptionTrainingSet, EpochBatchSampler, ImageSet, ImageTransform,
                           cache_files, collate_images, load_split, make_loader, with_captions)
from src.base.helpers import setup_logging
from src.base.families import load_captioner, load_family

BLIP_384 = BlipImageProcessor()  # BLIP-base and -large: 384x384, bicubic


@pytest.fixture
def sample(tmp_path):
    """A writable copy of the 15 real VizWiz photos (mtimes kept)."""
    shutil.copytree(SAMPLE, tmp_path / "vizwiz")
    return tmp_path / "vizwiz"


@pytest.fixture
def log_file(tmp_path):
    setup_logging(tmp_path / "run.log")
    return tmp_path / "run.log"


def _decoded(path, image_processor):
    """Pixels decoded from the file: a transform no dataset has given a cache."""
    transform = ImageTransform(image_processor)
    return transform(transform.load(path))


def _cache(data_dir, split, image_processor):
    records = load_split(data_dir, split, drop_rejected=False, drop_precanned=False)
    build_cache(records, ImageTransform(image_processor), data_dir / "cache", split)
    return records


def _uncached(records, image_processor):
    """What the datasets give without a cache: pixels, or the bad-image message."""
    dataset = ImageSet(records, ImageTransform(image_processor))
    return [dataset[i] for i in range(len(records))]


def _corrupt_keeping_size_and_mtime(paths):
    """Zero the files' bytes but keep their size and mtime: only the cache can still produce their pixels."""
    for path in paths:
        stat = os.stat(path)
        path.write_bytes(bytes(stat.st_size))
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_cached_pixels_are_bit_identical_on_real_photos(sample, log_file):
    expected = _uncached(load_split(sample, "val"), BLIP_384)
    records = _cache(sample, "val", BLIP_384)
    _corrupt_keeping_size_and_mtime([r.path for r in records])
    dataset = ImageSet(records, ImageTransform(BLIP_384))
    for index, want in enumerate(expected):
        item = dataset[index]
        assert item["bad"] is None, item["bad"]
        assert item["pixel_values"].shape == (3, 384, 384)
        assert torch.equal(item["pixel_values"], want["pixel_values"]), records[index].path.name
    assert "15 val images read from it, 0 changed since caching" in log_file.read_text()


def _synthetic_split(data_dir):
    """Every kind of file the loader handles: EXIF rotation, palette, alpha, 16-bit, CMYK, tiny, and broken ones."""
    images = data_dir / "val"
    images.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    noise = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    Image.fromarray(noise).save(images / "rotated.jpg", exif=exif)
    Image.fromarray(noise).convert("P", palette=Image.Palette.ADAPTIVE).save(images / "palette.png", transparency=0)
    Image.fromarray(np.dstack([noise, noise[..., :1]])).save(images / "alpha.png")
    Image.fromarray(noise[..., 0].astype(np.uint16) * 257).save(images / "gray16.png")
    Image.fromarray(noise).convert("CMYK").save(images / "cmyk.jpg")
    Image.fromarray(noise[:5, :7]).save(images / "tiny.png")
    (images / "empty.jpg").write_bytes(b"")
    (images / "cut.jpg").write_bytes((images / "rotated.jpg").read_bytes()[:400])
    names = sorted(p.name for p in images.iterdir()) + ["missing.jpg"]
    write_annotations(data_dir / "annotations" / "val.json", [{"id": i, "file_name": n} for i, n in enumerate(names)])


def test_synthetic_images_of_every_mode_match_and_bad_ones_stay_bad(tmp_path, tiny_blip):
    _synthetic_split(tmp_path)
    image_processor = load_family(tiny_blip).processor.image_processor
    expected = _uncached(load_split(tmp_path, "val"), image_processor)
    records = _cache(tmp_path, "val", image_processor)
    assert sum(e["bad"] is not None for e in expected) == 3  # empty, cut, missing

    good = [r.path for r, e in zip(records, expected) if e["bad"] is None]
    _corrupt_keeping_size_and_mtime(good)
    cached = ImageSet(records, ImageTransform(image_processor))
    for index, want in enumerate(expected):
        got = cached[index]
        assert got["bad"] == want["bad"]
        assert torch.equal(got["pixel_values"], want["pixel_values"]), records[index].path.name
    with pytest.raises(BadImage, match="missing.jpg: file not found"):
        cached.transform.load(tmp_path / "val" / "missing.jpg")


def test_a_rewritten_source_image_is_decoded_again(sample, log_file):
    records = _cache(sample, "val", BLIP_384)
    Image.new("RGB", (200, 100), (0, 255, 0)).save(records[3].path)
    cached = ImageSet(records, ImageTransform(BLIP_384))[3]["pixel_values"]
    assert torch.equal(cached, _decoded(records[3].path, BLIP_384))
    assert cached[1].min() > cached[0].max()  # the new green image, not the cached photo
    assert "14 val images read from it, 1 changed since caching" in log_file.read_text()


def test_a_cache_without_its_index_is_ignored(sample):
    records = _cache(sample, "val", BLIP_384)
    pixels_path, index_path = cache_files(sample / "cache", "val", (384, 384), Image.Resampling.BICUBIC)
    index_path.unlink()  # as a killed cache job leaves it: the index is written last
    assert pixels_path.is_file()
    _corrupt_keeping_size_and_mtime([records[0].path])
    item = ImageSet(records, ImageTransform(BLIP_384))[0]
    assert item["bad"] is not None and "cannot decode" in item["bad"]


def test_a_cache_for_another_input_size_is_never_read(sample, tiny_blip):
    records = _cache(sample, "val", load_family(tiny_blip).processor.image_processor)  # 32x32
    _corrupt_keeping_size_and_mtime([records[0].path])
    item = ImageSet(records, ImageTransform(BLIP_384))[0]
    assert item["bad"] is not None and "cannot decode" in item["bad"]


@pytest.mark.parametrize("broken", ["pixels", "index"])
def test_a_broken_cache_warns_once_and_falls_back_to_decoding(sample, log_file, broken):
    records = _cache(sample, "val", BLIP_384)
    pixels_path, index_path = cache_files(sample / "cache", "val", (384, 384), Image.Resampling.BICUBIC)
    if broken == "pixels":
        np.save(pixels_path, np.zeros((15, 384, 383, 3), dtype=np.uint8))
    else:
        index_path.write_text('{"rows": 15, "images": {')
    transform = ImageTransform(BLIP_384)
    ImageSet(records, transform)
    ImageSet(records, transform)  # a second validation pass: no second warning
    assert torch.equal(transform(transform.load(records[0].path)), _decoded(records[0].path, BLIP_384))
    log = log_file.read_text()
    bad_file = pixels_path if broken == "pixels" else index_path
    assert log.count("image cache unusable") == 1 and f"{bad_file}: image cache unusable" in log


def test_a_pickled_transform_reads_the_cache_without_carrying_the_array(sample):
    records = _cache(sample, "val", BLIP_384)
    transform = ImageTransform(BLIP_384)
    dataset = ImageSet(records, transform)
    expected = [dataset[i]["pixel_values"] for i in range(len(records))]
    _corrupt_keeping_size_and_mtime([r.path for r in records])
    pickled = pickle.dumps(transform)
    assert len(pickled) < 384 * 384 * 3  # not even one image of the array
    restored = pickle.loads(pickled)
    assert torch.equal(restored(restored.load(records[5].path)), expected[5])
    batches = list(make_loader(dataset, 2, collate_images, batch_size=4))  # worker processes
    assert [bad for b in batches for bad in b["bad"]] == []
    assert torch.equal(torch.cat([b["pixel_values"] for b in batches]), torch.stack(expected))


def test_a_training_step_reads_the_cache(tmp_path, tiny_blip):
    data_dir = make_dataset(tmp_path / "vizwiz", train=12, val=2, test=2, seed=3)
    family = load_family(tiny_blip)
    processor = family.processor
    _cache(data_dir, "train", processor.image_processor)
    records = with_captions(load_split(data_dir, "train"))
    expected = [_decoded(record.path, processor.image_processor) for record in records]
    _corrupt_keeping_size_and_mtime([r.path for r in records])

    model = load_captioner(tiny_blip)
    tokens = [family.training_sequences(r.captions, 40) for r in records]
    dataset = CaptionTrainingSet(records, ImageTransform(processor.image_processor), tokens)
    sampler = EpochBatchSampler(len(dataset), len(dataset), seed=0)
    batch = next(iter(make_loader(dataset, 0, CaptionCollator(family.pad_id), batch_sampler=sampler)))
    assert batch["bad"] == []
    order = sampler.batches(0)[0]
    assert torch.equal(batch["pixel_values"], torch.stack([expected[i] for i in order]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = family.loss(model, batch)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)


def test_cache_dir_flag_and_constant_place_and_find_the_cache(sample, monkeypatch, tmp_path, tiny_blip):
    cache_dir = tmp_path / "elsewhere"
    assert cache_main(["--data-dir", str(sample), "--checkpoint", str(tiny_blip),
                       "--splits", "val", "--workers", "0", "--cache-dir", str(cache_dir)]) == 0
    assert not (sample / "cache").exists()
    records = load_split(sample, "val")
    _corrupt_keeping_size_and_mtime([records[0].path])
    image_processor = load_family(tiny_blip).processor.image_processor
    assert ImageSet(records, ImageTransform(image_processor))[0]["bad"] is not None  # not in <data-dir>/cache
    monkeypatch.setattr(constants, "CACHE_DIR", str(cache_dir))
    assert ImageSet(records, ImageTransform(image_processor))[0]["bad"] is None


def test_cache_script_runs_end_to_end(demo_data, tiny_blip, tmp_path, capsys):
    """Its main() in this process (a subprocess would spend most of the time importing torch again)."""
    data_dir = tmp_path / "vizwiz"
    shutil.copytree(demo_data, data_dir)
    assert cache_main(["--data-dir", str(data_dir), "--checkpoint", str(tiny_blip), "--workers", "2"]) == 0
    output = capsys.readouterr()
    for split, count in [("train", 240), ("val", 40), ("test", 25)]:
        pixels_path, _ = cache_files(data_dir / "cache", split, (32, 32), Image.Resampling.BICUBIC)
        assert np.load(pixels_path, mmap_mode="r").shape == (count, 32, 32, 3)
        assert f"{split}: cached {count} images (0 unreadable)" in output.out
        assert f"caching {split}: 100%" in output.err  # the progress bar
    assert not list((data_dir / "cache").glob("*.tmp"))


def test_cache_script_on_a_missing_annotation_file_is_one_line_and_status_2(tmp_path, tiny_blip, capsys):
    (tmp_path / "annotations").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        cache_main(["--data-dir", str(tmp_path), "--checkpoint", str(tiny_blip), "--splits", "val"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "val.json: annotation file not found" in error
    assert not (tmp_path / "cache").exists()

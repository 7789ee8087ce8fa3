"""Annotation loading and image decoding, on synthetic edge cases and on real VizWiz photos."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BlipImageProcessor

from conftest import HUB_BASE, SAMPLE, write_annotations
from src.base.config import resolve, training_parser
from src.base.data import ImageTransform, load_image, load_split, with_captions, BadImage
from src.base.engine import Trainer
from src.base.helpers import UserError
from src.base.families import load_family
from src.ft.method import METHOD as FT


def _caption(image_id, text, rejected=False, precanned=False):
    return {"image_id": image_id, "caption": text, "is_rejected": rejected, "is_precanned": precanned}


@pytest.fixture
def small_split(tmp_path):
    images = [{"id": 7, "file_name": "a.jpg"}, {"id": 8, "file_name": "b.jpg"}, {"id": 9, "file_name": "c.jpg"}]
    annotations = [
        _caption(7, "a dog on a sofa"), _caption(7, "junk", rejected=True),
        _caption(7, "Quality issues are too severe to recognize visual content.", precanned=True),
        _caption(8, "Quality issues are too severe to recognize visual content.", precanned=True),
        _caption(8, "nope", rejected=True),
        # image 9 has no caption at all
    ]
    write_annotations(tmp_path / "annotations" / "val.json", images, annotations)
    return tmp_path


def test_rejected_and_precanned_are_dropped_by_default(small_split):
    records = {r.image_id: r.captions for r in load_split(small_split, "val")}
    assert records == {7: ["a dog on a sofa"], 8: [], 9: []}


def test_filters_can_be_switched_off(small_split):
    keep_all = {r.image_id: r.captions for r in load_split(small_split, "val", drop_rejected=False, drop_precanned=False)}
    assert len(keep_all[7]) == 3 and len(keep_all[8]) == 2
    keep_precanned = {r.image_id: r.captions for r in load_split(small_split, "val", drop_precanned=False)}
    assert keep_precanned[8] == ["Quality issues are too severe to recognize visual content."]


def test_images_left_without_captions_are_not_trained_or_scored(small_split):
    assert [r.image_id for r in with_captions(load_split(small_split, "val"))] == [7]


def test_test_split_without_annotations_keeps_every_image(tmp_path):
    write_annotations(tmp_path / "annotations" / "test.json", [{"id": 3, "file_name": "x.jpg"}, {"id": 4, "file_name": "y.jpg"}])
    records = load_split(tmp_path, "test")
    assert [r.image_id for r in records] == [3, 4]
    assert records[0].path == tmp_path / "test" / "x.jpg"


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"annotations": []}), "missing field 'images'"),
    (json.dumps({"images": [{"id": "1", "file_name": "a.jpg"}]}), "field 'id' should be int"),
    (json.dumps({"images": [{"id": 1}]}), "missing field 'file_name'"),
    (json.dumps({"images": [{"id": 1, "file_name": "a"}], "annotations": [{"image_id": 2, "caption": "x"}]}),
     "image_id 2 is not in 'images'"),
])
def test_malformed_annotations_name_the_file_and_problem(tmp_path, content, message):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "train.json").write_text(content)
    with pytest.raises(UserError, match=message) as error:
        load_split(tmp_path, "train")
    assert "train.json" in str(error.value)


def test_missing_data_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="data directory does not exist"):
        load_split(tmp_path / "nowhere", "train")


def test_exif_orientation_is_applied(tmp_path):
    upright = Image.new("RGB", (60, 40), "blue")
    upright.paste((255, 0, 0), (0, 0, 20, 10))  # red block at the top-left when upright
    exif = Image.Exif()
    exif[0x0112] = 6  # viewer must rotate 90 degrees clockwise
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "sideways.jpg", quality=95, exif=exif)
    image = load_image(tmp_path / "sideways.jpg")
    assert image.size == (60, 40)
    assert np.allclose(np.asarray(image)[3, 3], [255, 0, 0], atol=40)
    assert np.allclose(np.asarray(image)[35, 55], [0, 0, 255], atol=40)


@pytest.mark.parametrize("mode, make, expected", [
    ("L", lambda: Image.new("L", (8, 8), 200), (200, 200, 200)),
    ("P", lambda: Image.new("RGB", (8, 8), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE), (10, 200, 30)),
    ("RGBA transparent", lambda: Image.new("RGBA", (8, 8), (0, 0, 0, 0)), (255, 255, 255)),
    ("LA", lambda: Image.new("LA", (8, 8), (50, 255)), (50, 50, 50)),
    ("CMYK", lambda: Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0)),
    ("I;16", lambda: Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)), (255, 255, 255)),
    ("I;16 mid", lambda: Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)), (128, 128, 128)),
    ("1", lambda: Image.new("1", (8, 8), 1), (255, 255, 255)),
    ("F", lambda: Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32) * 255), (127, 127, 127)),
])
def test_any_mode_becomes_8bit_rgb(tmp_path, mode, make, expected):
    path = tmp_path / "image.png" if mode not in ("CMYK", "F") else tmp_path / ("image.jpg" if mode == "CMYK" else "image.tiff")
    make().save(path)
    image = load_image(path)
    assert image.mode == "RGB"
    assert np.allclose(np.asarray(image)[4, 4], expected, atol=3)


@pytest.mark.parametrize("content", [b"", b"this is not an image", None])
def test_unreadable_files_raise_bad_image(tmp_path, content):
    path = tmp_path / "broken.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(BadImage, match="broken.jpg"):
        load_image(path)


def test_truncated_jpeg_is_bad_image(tmp_path):
    Image.new("RGB", (300, 300), "green").save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImage, match="cut.jpg"):
        load_image(tmp_path / "cut.jpg")


def test_real_vizwiz_sample_loads():
    records = load_split(SAMPLE, "val")
    assert len(records) == 15
    kept = with_captions(records)
    assert len(kept) == 10  # the 5 unrecognisable photos carry only the precanned caption
    sizes = {}
    for record in records:
        image = load_image(record.path)
        assert image.mode == "RGB"
        sizes[record.path.name] = image.size
    # stored 960x720 with EXIF orientation 6: upright it is portrait
    assert sizes["VizWiz_val_00000010.jpg"] == (720, 960)


@pytest.fixture(scope="module")
def blip_image_processor():
    """The real BLIP checkpoints' image processor (the hub's preprocessor_config.json: 384x384, bicubic)."""
    return BlipImageProcessor.from_pretrained(HUB_BASE)


@pytest.fixture(scope="module")
def processor_pixels(blip_image_processor):
    """BlipImageProcessor's pixels of each real sample photo, fully decoded."""
    return {path: blip_image_processor(images=load_image(path), return_tensors="pt")["pixel_values"][0].float()
            for path in sorted((SAMPLE / "val").glob("*.jpg"))}


def _differences(transform, processor_pixels):
    return [(transform(transform.load(path)) - reference).abs() for path, reference in processor_pixels.items()]


def test_exact_preprocessing_equals_blip_image_processor(blip_image_processor, processor_pixels):
    """--exact-preprocessing: the checkpoint's own BlipImageProcessor's pixels, to float rounding, on each photo."""
    differences = _differences(ImageTransform(blip_image_processor, use_draft=False), processor_pixels)
    assert max(float(d.max()) for d in differences) < 1e-6


def test_default_preprocessing_is_close_to_blip_image_processor(blip_image_processor, processor_pixels):
    """Reduced-size JPEG decoding (the default) changes pixels slightly, in normalised units (one grey level is
    about 0.015): on the 15 real photos the mean difference was 0.003 and the largest 0.34, at sharp edges."""
    differences = _differences(ImageTransform(blip_image_processor), processor_pixels)
    assert 0 < float(torch.cat([d.flatten() for d in differences]).mean()) < 0.01
    assert max(float(d.max()) for d in differences) < 0.5


def test_exact_preprocessing_flag_reaches_the_training_transform(tiny_blip, demo_data, tmp_path):
    for flags, drafts in (([], True), (["--exact-preprocessing"], False)):
        argv = ["--data-dir", str(demo_data), "--checkpoint", str(tiny_blip), "--output-dir", str(tmp_path), *flags]
        assert Trainer(FT, resolve(FT, training_parser("x").parse_args(argv))).transform.use_draft is drafts

"""scripts/get_data.py against a local HTTP server that serves small archives in the real VizWiz layout."""
import hashlib
import io
import json
import shutil
import socket
import threading
import zipfile
from collections import namedtuple
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from scripts import get_data
from src.base import constants
from src.base.data import load_image, load_split

IMAGES_PER_SPLIT = {"train": 3, "val": 3, "test": 2}


class ArchiveServer:
    """Serves `files` (URL path -> bytes) over HTTP with Range requests; records each request's (path, Range).

    A path in `drop_once` gets half of its body and then a closed connection, the next time it is asked for.
    """

    def __init__(self):
        self.files, self.requests, self.drop_once = {}, [], set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.answer(self)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def answer(self, handler):
        asked = handler.headers.get("Range")
        self.requests.append((handler.path, asked))
        body = self.files.get(handler.path)
        if body is None:
            handler.send_error(404)
            return
        start = int(asked.removeprefix("bytes=").removesuffix("-")) if asked else 0
        handler.send_response(206 if asked else 200)
        if asked:
            handler.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        handler.send_header("Content-Length", str(len(body) - start))
        handler.end_headers()
        rest = body[start:]
        if handler.path in self.drop_once:
            self.drop_once.discard(handler.path)
            rest = rest[:len(rest) // 2]  # then the server closes the connection (HTTP/1.0)
        handler.wfile.write(rest)

    def asked_for(self, path):
        return [rang for asked, rang in self.requests if asked == path]


def _jpeg(shade):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (shade, 255 - shade, 90)).save(buffer, "JPEG")
    return buffer.getvalue()


def _zip(members):
    """An uncompressed zip of `members` (name -> bytes), with the folder entries real archives have."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        for folder in sorted({name.split("/")[0] + "/" for name in members}):
            zf.writestr(folder, b"")
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def _image_names(split):
    return [f"VizWiz_{split}_{i:08d}.jpg" for i in range(IMAGES_PER_SPLIT[split])]


def _images(split):
    return {f"{split}/{name}": _jpeg(40 * i) for i, name in enumerate(_image_names(split))}


def _annotations(split):
    images = [{"id": 100 * len(split) + i, "file_name": name} for i, name in enumerate(_image_names(split))]
    content = {"images": images}
    if split != "test":  # like the real test split: images, no captions
        content["annotations"] = [{"image_id": image["id"], "caption": f"a photo of thing {image['id']}",
                                   "is_rejected": False, "is_precanned": False} for image in images]
    return json.dumps(content).encode()


@pytest.fixture
def server(monkeypatch):
    """The real layout: caption/annotations.zip (annotations/<split>.json) and images/<split>.zip (<split>/*.jpg)."""
    server = ArchiveServer()
    server.files["/caption/annotations.zip"] = _zip({f"annotations/{split}.json": _annotations(split)
                                                     for split in IMAGES_PER_SPLIT})
    for split in IMAGES_PER_SPLIT:
        server.files[f"/images/{split}.zip"] = _zip(_images(split))
    monkeypatch.setattr(constants, "VIZWIZ_URL", server.url)
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def _run(data_dir, *args):
    return get_data.main(["--data-dir", str(data_dir), "--workers", "2", *args])


def _error_line(capsys, data_dir, *args):
    """Run, expecting exit status 2; returns the one error line (progress bars may share stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        _run(data_dir, *args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0])
    return errors[0]


def _leftovers(data_dir):
    return sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*")
                  if p.name.endswith((".zip", ".part", ".sha256", ".unpacking", ".old")))


def test_download_unpacks_the_layout_the_loader_reads(server, tmp_path):
    assert _run(tmp_path / "vizwiz") == 0
    data_dir = tmp_path / "vizwiz"
    for split, count in IMAGES_PER_SPLIT.items():
        records = load_split(data_dir, split)
        assert [r.path.name for r in records] == _image_names(split)
        assert sorted(p.name for p in (data_dir / split).iterdir()) == _image_names(split)
        for record in records:
            assert load_image(record.path).size == (8, 6)
        marker = json.loads((data_dir / "downloads" / f"{split}.done").read_text())
        assert marker["sha256"] == hashlib.sha256(server.files[f"/images/{split}.zip"]).hexdigest()
        assert (marker["images"], marker["bad_images"]) == (count, 0)
    assert len(load_split(data_dir, "val")[0].captions) == 1
    assert _leftovers(data_dir) == []  # archives deleted once unpacked and verified, nothing half-done


def test_second_run_downloads_nothing(server, tmp_path, capsys):
    _run(tmp_path)
    server.requests.clear()
    capsys.readouterr()
    assert _run(tmp_path) == 0
    assert server.requests == []
    out = capsys.readouterr().out
    assert all(f"{part}: done" in out for part in ["annotations", *IMAGES_PER_SPLIT])  # not even verified again


def test_dropped_connection_is_resumed_with_a_range_request(server, tmp_path, capsys):
    server.drop_once.add("/images/val.zip")
    _run(tmp_path, "--splits", "val", "--keep-archives")
    served = server.files["/images/val.zip"]
    first, second = server.asked_for("/images/val.zip")
    assert first is None and second == f"bytes={len(served) // 2}-"
    assert (tmp_path / "downloads" / "val.zip").read_bytes() == served
    assert (tmp_path / "downloads" / "val.zip.sha256").read_text().split()[0] == hashlib.sha256(served).hexdigest()
    assert "resuming" in capsys.readouterr().out
    assert len(load_split(tmp_path, "val")) == IMAGES_PER_SPLIT["val"]


def test_interrupted_download_continues_on_the_next_run(server, tmp_path):
    served = server.files["/images/test.zip"]
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "test.zip.part").write_bytes(served[:100])  # what a killed run left
    _run(tmp_path, "--splits", "test", "--keep-archives")
    assert server.asked_for("/images/test.zip") == ["bytes=100-"]
    assert (tmp_path / "downloads" / "test.zip").read_bytes() == served


def test_kept_archive_is_reused_only_while_it_matches_its_recorded_sha256(server, tmp_path):
    _run(tmp_path, "--splits", "val", "--keep-archives")
    archive, marker = tmp_path / "downloads" / "val.zip", tmp_path / "downloads" / "val.done"
    marker.unlink()  # as if a run had stopped between downloading and unpacking
    shutil.rmtree(tmp_path / "val")
    _run(tmp_path, "--splits", "val", "--keep-archives")
    assert len(server.asked_for("/images/val.zip")) == 1  # unpacked again from the kept archive
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == _image_names("val")

    marker.unlink()
    shutil.rmtree(tmp_path / "val")
    archive.write_bytes(archive.read_bytes()[:-1] + b"?")  # changed on disk since it was downloaded
    _run(tmp_path, "--splits", "val", "--keep-archives")
    assert len(server.asked_for("/images/val.zip")) == 2
    assert archive.read_bytes() == server.files["/images/val.zip"]


def test_corrupt_archive_is_one_error_leaves_nothing_and_is_fetched_again(server, tmp_path, capsys):
    good = server.files["/images/val.zip"]
    second_image = good.find(_images("val")["val/VizWiz_val_00000001.jpg"])
    server.files["/images/val.zip"] = good[:second_image + 40] + b"\x00" * 8 + good[second_image + 48:]

    line = _error_line(capsys, tmp_path, "--splits", "val")
    assert "val.zip" in line and "corrupt" in line
    assert not (tmp_path / "val").exists()  # the first image was unpacked, then removed with the rest
    assert not (tmp_path / "downloads" / "val.done").exists()
    assert _leftovers(tmp_path) == []  # the bad download is gone: a rerun fetches it again

    server.files["/images/val.zip"] = good
    assert _run(tmp_path, "--splits", "val") == 0
    assert [load_image(r.path).size for r in load_split(tmp_path, "val")] == [(8, 6)] * 3


def test_missing_and_undecodable_images_are_listed(server, tmp_path, capsys):
    images = _images("val")
    del images["val/VizWiz_val_00000000.jpg"]
    images["val/VizWiz_val_00000002.jpg"] = images["val/VizWiz_val_00000002.jpg"][:60]  # truncated
    server.files["/images/val.zip"] = _zip(images)

    assert _run(tmp_path, "--splits", "val") == 0
    listed = (tmp_path / "downloads" / "val_bad_images.txt").read_text().splitlines()
    assert len(listed) == 2
    assert "VizWiz_val_00000000.jpg: file not found" in listed[0]
    assert "VizWiz_val_00000002.jpg: cannot decode" in listed[1]
    out = capsys.readouterr().out
    assert "2 of 3 annotated images" in out and all(problem in out for problem in listed)
    assert json.loads((tmp_path / "downloads" / "val.done").read_text())["bad_images"] == 2


def test_split_unpacked_by_hand_is_verified_not_downloaded(server, tmp_path):
    for member, data in _images("train").items():
        (tmp_path / member).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / member).write_bytes(data)
    _run(tmp_path, "--splits", "train")
    assert server.asked_for("/images/train.zip") == []
    assert json.loads((tmp_path / "downloads" / "train.done").read_text())["bad_images"] == 0


def test_unreachable_server_fails_in_one_line_naming_the_url(monkeypatch, tmp_path, capsys):
    with socket.socket() as sock:  # a port nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setattr(constants, "VIZWIZ_URL", url)
    with pytest.raises(SystemExit) as exit_info:
        _run(tmp_path)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: cannot download {url}/caption/annotations.zip: ")


def test_not_enough_disk_space_stops_before_downloading(server, tmp_path, capsys, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(get_data.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 100, 100))
    assert "GB free" in _error_line(capsys, tmp_path)
    assert not any((tmp_path / "downloads").iterdir())


# Repository listings as the hub gives them (list_repo_files), and what of each from_pretrained needs offline.
BLIP_FILES = [".gitattributes", "README.md", "config.json", "model.safetensors", "preprocessor_config.json",
              "pytorch_model.bin", "special_tokens_map.json", "tf_model.h5", "tokenizer.json", "tokenizer_config.json",
              "vocab.txt"]
BLIP_CHOSEN = ["config.json", "model.safetensors", "preprocessor_config.json", "special_tokens_map.json",
               "tokenizer.json", "tokenizer_config.json", "vocab.txt"]
REPOSITORIES = {
    "only .bin weights": (  # microsoft/git-base's kind
        [".gitattributes", "README.md", "config.json", "preprocessor_config.json", "pytorch_model.bin",
         "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"],
        ["config.json", "preprocessor_config.json", "pytorch_model.bin", "special_tokens_map.json", "tokenizer.json",
         "tokenizer_config.json", "vocab.txt"]),
    "safetensors, .bin and TensorFlow": (BLIP_FILES, BLIP_CHOSEN),
    "sharded safetensors and .bin": (  # Salesforce/blip2-opt-2.7b's kind
        ["README.md", "added_tokens.json", "config.json", "generation_config.json", "merges.txt",
         "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
         "preprocessor_config.json", "processor_config.json", "pytorch_model-00001-of-00002.bin",
         "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json", "special_tokens_map.json",
         "tokenizer.json", "tokenizer_config.json", "vocab.json"],
        ["added_tokens.json", "config.json", "generation_config.json", "merges.txt", "model-00001-of-00002.safetensors",
         "model-00002-of-00002.safetensors", "model.safetensors.index.json", "preprocessor_config.json",
         "processor_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.json"]),
    "sharded .bin beside Flax, TensorFlow and ONNX": (
        ["config.json", "flax_model.msgpack", "onnx/config.json", "onnx/model.onnx", "pytorch_model-00001-of-00003.bin",
         "pytorch_model-00002-of-00003.bin", "pytorch_model-00003-of-00003.bin", "pytorch_model.bin.index.json",
         "rust_model.ot", "spiece.model", "tf_model.h5", "tokenizer_config.json"],
        ["config.json", "pytorch_model-00001-of-00003.bin", "pytorch_model-00002-of-00003.bin",
         "pytorch_model-00003-of-00003.bin", "pytorch_model.bin.index.json", "spiece.model", "tokenizer_config.json"]),
}


class FakeHub:
    """The hub's list_repo_files and snapshot_download, for repositories holding `files` (name -> listing; BLIP's
    listing for any other name); records each call's (name, keyword arguments). `error`: what the hub raises."""

    def __init__(self, monkeypatch, error=None, files=None):
        self.calls, self.listed, self.error, self.files = [], [], error, files or {}
        monkeypatch.setattr(get_data, "list_repo_files", self.list_repo_files)
        monkeypatch.setattr(get_data, "snapshot_download", self.snapshot_download)

    def list_repo_files(self, name, **kwargs):
        self.listed.append((name, kwargs))
        if self.error:
            raise self.error
        return self.files.get(name, BLIP_FILES)

    def snapshot_download(self, name, **kwargs):
        self.calls.append((name, kwargs))
        return f"/hf-cache/{name}"


def test_checkpoints_are_the_configured_names_with_the_environment_token(server, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", "hf_from_the_environment")
    _run(tmp_path, "--splits", "val", "--checkpoints")
    assert [name for name, _ in hub.calls] == ["Salesforce/blip-image-captioning-base",
                                               "Salesforce/blip-image-captioning-large"]
    for _, kwargs in hub.calls + hub.listed:
        assert kwargs["token"] == "hf_from_the_environment"
    for _, kwargs in hub.calls:  # safetensors, not the pickled .bin beside them, nor TensorFlow's weights
        assert kwargs["allow_patterns"] == BLIP_CHOSEN


@pytest.mark.parametrize("choice, names", [
    ("all", ["Salesforce/blip-image-captioning-base", "Salesforce/blip-image-captioning-large", "microsoft/git-base",
             "microsoft/git-large-textcaps", "Salesforce/blip2-opt-2.7b"]),
    ("microsoft/git-base, Salesforce/blip2-opt-2.7b,microsoft/git-base", ["microsoft/git-base",
                                                                         "Salesforce/blip2-opt-2.7b"])])
def test_checkpoints_all_fetches_every_familys_and_names_fetch_those(choice, names, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    get_data.fetch_checkpoints(get_data.hub_checkpoints(choice))
    assert [name for name, _ in hub.calls] == names


@pytest.mark.parametrize("kind", REPOSITORIES)
def test_one_copy_of_the_weights_safetensors_first_with_the_settings_files(kind, monkeypatch):
    listing, chosen = REPOSITORIES[kind]
    hub = FakeHub(monkeypatch, files={"someone/model": listing})
    get_data.fetch_checkpoints(["someone/model"])
    assert hub.calls == [("someone/model", {"allow_patterns": chosen, "token": False})]


def test_checkpoints_skip_local_directories_and_never_read_a_token_file(tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    other = "Salesforce/blip-itm-base-coco"
    monkeypatch.setattr(constants, "HUB_CHECKPOINTS", f"{tmp_path}, {other},{other}")
    get_data.fetch_checkpoints(get_data.hub_checkpoints())
    assert hub.listed == [(other, {"token": False})]
    assert hub.calls == [(other, {"allow_patterns": BLIP_CHOSEN, "token": False})]


def test_unreachable_hub_fails_in_one_line_naming_the_checkpoint(tmp_path, monkeypatch, capsys):
    FakeHub(monkeypatch, error=OSError("cannot reach the hub\nplease check"))
    line = _error_line(capsys, tmp_path, "--checkpoints")
    assert line == ("error: cannot fetch checkpoint Salesforce/blip-image-captioning-base from the Hugging Face hub: "
                    "cannot reach the hub please check")


@pytest.mark.parametrize("choice, error", [
    ("someone/tf-only", "checkpoint someone/tf-only: the hub repository has no PyTorch weights (no .safetensors or "
                        ".bin file)"),
    (" , ", "--checkpoints ' , ': names no checkpoint (give all, or hub names separated by commas)")])
def test_a_checkpoint_without_pytorch_weights_or_no_name_fails_in_one_line(choice, error, tmp_path, monkeypatch,
                                                                           capsys):
    FakeHub(monkeypatch, files={"someone/tf-only": ["config.json", "tf_model.h5", "flax_model.msgpack"]})
    assert _error_line(capsys, tmp_path, "--checkpoints", choice) == f"error: {error}"

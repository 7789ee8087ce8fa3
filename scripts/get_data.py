"""Download VizWiz-Captions into the VizWiz layout, and the Hugging Face checkpoints, in one command.

    python scripts/get_data.py --checkpoints          # DATA_DIR (data/vizwiz), every split, and the checkpoints
    python scripts/get_data.py --data-dir /scratch/you/vizwiz --splits train val
    python scripts/get_data.py --checkpoints all      # also every family's checkpoints (BLIP, GIT, BLIP-2)

From VIZWIZ_URL (src/base/constants.py) it fetches caption/annotations.zip and images/<split>.zip
into <data-dir>/downloads/, resuming an interrupted download where it stopped, and unpacks them
into annotations/{train,val,test}.json and <split>/*.jpg, each into a temporary directory that is
renamed into place only when complete. Then every annotated image of the split is decoded; those
missing or undecodable are listed on the console and in downloads/<split>_bad_images.txt. Only
then is the split marked done (downloads/<split>.done) and its archive deleted (--keep-archives
keeps it). A rerun skips what is done: running it twice downloads nothing the second time. A split
already unpacked by hand is verified and kept instead of downloaded again.

VizWiz publishes no checksums: a download is checked against its Content-Length, and its members
against the zip's CRC-32s while unpacking. The sha256 of each archive is written next to it
(<archive>.sha256; a rerun checks a kept archive against it) and into the .done marker.

--checkpoints also fetches HUB_CHECKPOINTS (default: FT_CHECKPOINT and PEFT_CHECKPOINT) into the
Hugging Face cache (HF_HOME in src/base/constants.py, which the SGE jobs use too); `--checkpoints all`
those and every family's (families/*.py `checkpoints`); `--checkpoints NAME[,NAME...]` those hub names.
Of each: config, tokenizer and processor files and one copy of the weights (safetensors where the
repository has them, else PyTorch's .bin; sharded ones with their index), never other frameworks'
(TensorFlow, Flax, ONNX). A token, if you need one, is read from HF_TOKEN in the environment, never
from a file.
"""
import argparse
import hashlib
import http.client
import os
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.base import constants as C  # noqa: E402  (first: it exports HF_HOME, which huggingface_hub reads on import)
from huggingface_hub import list_repo_files, snapshot_download  # noqa: E402
from tqdm import tqdm  # noqa: E402

from src.base.cli import ArgumentParser  # noqa: E402
from src.base.hub import cache_dir  # noqa: E402
from src.base.data import SPLITS, BadImage, annotation_path, default_num_workers, load_image, load_split  # noqa: E402
from src.base.families import FAMILIES  # noqa: E402
from src.base.helpers import (UserError, exit_on_user_error, log, recover_dir, replace_dir_atomic,  # noqa: E402
                              setup_logging, write_json_atomic)

ANNOTATIONS_ARCHIVE = "caption/annotations.zip"  # annotations/{train,val,test}.json
IMAGES_ARCHIVE = "images/{split}.zip"            # <split>/VizWiz_<split>_00000000.jpg ...
# Besides the weights, what from_pretrained reads: configs, tokenizer and processor files (vocab.txt, merges.txt,
# SentencePiece's .model).
SETTINGS_FILES = (".json", ".txt", ".model")
TIMEOUT_S = 60
CHUNK_BYTES = 1 << 20
BAD_IMAGES_SHOWN = 20
BAR = {"mininterval": 0.5 if sys.stderr.isatty() else 60}  # a line a minute in a job log
BYTES_BAR = {**BAR, "unit": "B", "unit_scale": True, "unit_divisor": 1024}


# ---------------------------------------------------------------- downloading

def download(url, downloads):
    """`downloads/<file name>`, fetched from `url` unless a copy matching its recorded sha256 is there; returns
    the path and its sha256."""
    archive = archive_path(url, downloads)
    recorded = _sha256_file(archive)
    if archive.is_file():
        digest = sha256(archive)
        if recorded.is_file() and recorded.read_text().split()[:1] == [digest]:
            log.info(f"{archive}: downloaded before, sha256 matches")
            return archive, digest
        log.info(f"{archive}: not the file recorded in {recorded.name}; downloading it again")
        discard(archive)
    part = archive.with_name(archive.name + ".part")
    log.info(f"downloading {url}")
    fetch(url, part)
    digest = sha256(part)
    recorded.write_text(f"{digest}  {archive.name}\n")
    os.replace(part, archive)
    return archive, digest


def archive_path(url, downloads):
    return downloads / PurePosixPath(urllib.parse.urlsplit(url).path).name


def fetch(url, part):
    """Download `url` into `part`, continuing from what it holds, until it has the whole Content-Length."""
    while True:
        before = _size(part)
        total = _request_once(url, part)
        after = _size(part)
        if total is None or after == total:
            return
        if not before < after < total:
            raise UserError(f"cannot download {url}: got {after:,} of {total:,} bytes (run again to resume)")
        log.info(f"{url}: connection dropped at byte {after:,} of {total:,}; resuming")


def _request_once(url, part):
    """One GET of `url`, appended to `part` from its current size; returns the file's size (None: not given)."""
    offset = _size(part)
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # `part` is longer than the file (changed on the server?): start over
            part.unlink()
            return _request_once(url, part)
        raise UserError(f"cannot download {url}: HTTP {error.code} {error.reason}")
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
        raise UserError(f"cannot download {url}: {getattr(error, 'reason', error)}")
    with response:
        resumed = response.status == 206
        start, total = _content_range(response) if resumed else (0, _length(response.headers["Content-Length"]))
        if resumed and start != offset:
            raise UserError(f"cannot download {url}: asked for bytes {offset:,}-, the server sent {start:,}-")
        if total is not None:
            _check_free_space(part.parent, 2 * total - start, url)  # the rest of the archive, then its content
        with open(part, "ab" if resumed else "wb") as f, \
                tqdm(total=total, initial=start, desc=part.name.removesuffix(".part"), **BYTES_BAR) as bar:
            while chunk := _read(response):
                f.write(chunk)
                bar.update(len(chunk))
    return total


def _read(response):
    """The next chunk of the body; b"" at its end or where the connection dropped (the caller resumes)."""
    try:
        return response.read(CHUNK_BYTES)
    except (OSError, http.client.HTTPException):
        return b""


def _content_range(response):
    """(first byte, file size or None) from a 206 response's `Content-Range: bytes 100-199/200`."""
    spans, _, size = response.headers.get("Content-Range", "").removeprefix("bytes ").partition("/")
    return int(spans.partition("-")[0] or 0), _length(size)


def _length(value):
    return int(value) if value and value.isdigit() else None


def _check_free_space(directory, needed, url):
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise UserError(f"{directory}: {free / 1e9:.1f} GB free, but {url} needs {needed / 1e9:.1f} GB "
                        f"to download and unpack (set --data-dir or DATA_DIR to a larger disk)")


def _size(path):
    return path.stat().st_size if path.exists() else 0


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_file(archive):
    return archive.with_name(archive.name + ".sha256")


def discard(archive):
    """Delete a downloaded archive and its recorded sha256."""
    archive.unlink(missing_ok=True)
    _sha256_file(archive).unlink(missing_ok=True)


# ---------------------------------------------------------------- unpacking and verifying

def unpack(archive, target, required=()):
    """Extract `archive`'s files, by base name, into the directory `target`, which appears complete or not at all.

    A corrupt archive is deleted (so that a rerun downloads it again) and reported in one line.
    """
    tmp = target.with_name(target.name + ".unpacking")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _extract(archive, tmp)
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:
        shutil.rmtree(tmp)
        discard(archive)
        raise UserError(f"{archive}: corrupt archive ({error}); deleted it, run again to download it anew")
    missing = [name for name in required if not (tmp / name).is_file()]
    if missing:
        shutil.rmtree(tmp)
        raise UserError(f"{archive}: has no {missing[0]} (is this the VizWiz-Captions archive? check VIZWIZ_URL)")
    replace_dir_atomic(tmp, target)


def _extract(archive, directory):
    with zipfile.ZipFile(archive) as zf:
        members = [member for member in zf.infolist() if _is_content(member)]
        with tqdm(total=sum(m.file_size for m in members), desc=f"unpacking {archive.name}", **BYTES_BAR) as bar:
            for member in members:
                # By base name: whatever folder the archive wraps them in, and nothing lands outside `directory`.
                with zf.open(member) as source, open(directory / PurePosixPath(member.filename).name, "wb") as dest:
                    shutil.copyfileobj(source, dest, CHUNK_BYTES)
                bar.update(member.file_size)


def _is_content(member):
    """Files, not folders, macOS resource forks (__MACOSX/, ._name) or other hidden files."""
    path = PurePosixPath(member.filename)
    return not member.is_dir() and "__MACOSX" not in path.parts and not path.name.startswith(".")


def find_bad_images(records, workers, desc):
    """'path: problem' for each record whose image is missing or cannot be decoded (as training decodes it)."""
    def problem(record):
        try:
            load_image(record.path)
        except BadImage as error:
            return str(error)

    with ThreadPoolExecutor(max(1, workers)) as pool:  # Pillow decodes without holding the GIL
        problems = list(tqdm(pool.map(problem, records), total=len(records), desc=desc, **BAR))
    return [p for p in problems if p is not None]


def report_bad_images(split, bad, total, list_file):
    if not bad:
        list_file.unlink(missing_ok=True)
        log.info(f"{split}: all {total:,} annotated images are present and decodable")
        return
    list_file.write_text("".join(f"{problem}\n" for problem in bad))
    log.info(f"warning: {split}: {len(bad):,} of {total:,} annotated images are missing or cannot be decoded "
             f"(all listed in {list_file}; training skips them):")
    for problem in bad[:BAD_IMAGES_SHOWN]:
        log.info(f"  {problem}")
    if len(bad) > BAD_IMAGES_SHOWN:
        log.info(f"  ... and {len(bad) - BAD_IMAGES_SHOWN:,} more")


# ---------------------------------------------------------------- the data set

def get_annotations(data_dir, downloads, splits, keep_archive):
    marker = downloads / "annotations.done"
    recover_dir(data_dir / "annotations")
    if marker.is_file() and all(annotation_path(data_dir, split).is_file() for split in splits):
        log.info(f"annotations: done ({marker}), skipped")
        return
    url = f"{C.VIZWIZ_URL}/{ANNOTATIONS_ARCHIVE}"
    archive, digest = download(url, downloads)
    unpack(archive, data_dir / "annotations", required=[f"{split}.json" for split in splits])
    for split in splits:
        load_split(data_dir, split)  # a malformed file is reported now, and the marker not written
    write_json_atomic(marker, {"url": url, "bytes": archive.stat().st_size, "sha256": digest})
    if not keep_archive:
        discard(archive)
    log.info(f"annotations: {', '.join(str(annotation_path(data_dir, split)) for split in splits)}")


def get_split(split, data_dir, downloads, workers, keep_archive):
    marker = downloads / f"{split}.done"
    image_dir = recover_dir(data_dir / split)
    if marker.is_file() and image_dir.is_dir():
        log.info(f"{split}: done ({marker}), skipped")
        return
    records = load_split(data_dir, split, drop_rejected=False, drop_precanned=False)
    url = f"{C.VIZWIZ_URL}/{IMAGES_ARCHIVE.format(split=split)}"
    if image_dir.is_dir() and not find_bad_images(records, workers, f"checking {image_dir}"):
        write_json_atomic(marker, {"found_in_place": str(image_dir), "images": len(records), "bad_images": 0})
        if not keep_archive:
            discard(archive_path(url, downloads))  # left by a run stopped between unpacking and the marker
        log.info(f"{split}: all {len(records):,} annotated images were already in {image_dir}; nothing to download")
        return
    archive, digest = download(url, downloads)
    unpack(archive, image_dir)
    bad = find_bad_images(records, workers, f"verifying {split}")
    report_bad_images(split, bad, len(records), downloads / f"{split}_bad_images.txt")
    write_json_atomic(marker, {"url": url, "bytes": archive.stat().st_size, "sha256": digest,
                               "images": len(records), "bad_images": len(bad)})
    if not keep_archive:
        discard(archive)
    log.info(f"{split}: {len(records):,} images in {image_dir}")


# ---------------------------------------------------------------- checkpoints

def hub_checkpoints(choice=""):
    """The checkpoints `--checkpoints choice` names, without repeats: HUB_CHECKPOINTS for "", those and every
    family's for "all", else the comma-separated names given."""
    if choice == "all":
        names = [*C.HUB_CHECKPOINTS.split(","), *(name for family in FAMILIES for name in family.checkpoints)]
    else:
        names = (choice or C.HUB_CHECKPOINTS).split(",")
    names = list(dict.fromkeys(name.strip() for name in names if name.strip()))
    if not names:
        raise UserError(f"--checkpoints {choice!r}: names no checkpoint (give all, or hub names separated by commas)")
    return names


def checkpoint_files(name, repo_files):
    """Which of the hub repository `name`'s files to fetch: the settings files and one copy of the weights, safetensors
    if it has them, else PyTorch's .bin (transformers reads those with torch.load(weights_only=True): tensors only).
    Sharded weights come with their index; other frameworks' weights and files in folders are left out."""
    top = [f for f in repo_files if "/" not in f]
    weights = ".safetensors" if any(f.endswith(".safetensors") for f in top) else ".bin"
    if not any(f.endswith(weights) for f in top):
        raise UserError(f"checkpoint {name}: the hub repository has no PyTorch weights (no .safetensors or .bin file)")
    return [f for f in top if f.endswith((weights, f"{weights}.index.json"))
            or (f.endswith(SETTINGS_FILES) and not f.endswith(".index.json"))]


def fetch_checkpoints(names):
    token = os.environ.get("HF_TOKEN") or False  # False: no token from a file either
    log.info(f"checkpoints go to the Hugging Face cache in {cache_dir()}: jobs load them from there, offline, while "
             f"they see the same HF_HOME (set it in src/base/constants.py, not only in your shell)")
    for name in names:
        if Path(name).is_dir():
            log.info(f"{name}: a local directory, nothing to fetch")
            continue
        try:
            files = checkpoint_files(name, list_repo_files(name, token=token))
            path = snapshot_download(name, allow_patterns=files, token=token)
        except (OSError, ValueError) as error:  # the hub's HTTP and offline errors are OSErrors
            reason = " ".join(str(error).split())
            raise UserError(f"cannot fetch checkpoint {name} from the Hugging Face hub: {reason}")
        log.info(f"{name}: {', '.join(files)} in {path}")


@exit_on_user_error
def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=C.DATA_DIR, help="where the VizWiz layout goes (default: DATA_DIR)")
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS))
    parser.add_argument("--checkpoints", nargs="?", const="", metavar="all|NAME[,NAME...]",
                        help="also fetch checkpoints into the HF cache: HUB_CHECKPOINTS (no value), those and every "
                             "family's (all), or these hub names")
    parser.add_argument("--keep-archives", action="store_true", help="keep the zip files in <data-dir>/downloads/")
    parser.add_argument("--workers", type=int, default=default_num_workers(), help="threads decoding images")
    args = parser.parse_args(argv)
    setup_logging()
    data_dir = Path(args.data_dir)
    downloads = data_dir / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    if args.checkpoints is not None:
        fetch_checkpoints(hub_checkpoints(args.checkpoints))
    get_annotations(data_dir, downloads, args.splits, args.keep_archives)
    for split in args.splits:
        get_split(split, data_dir, downloads, args.workers, args.keep_archives)
    log.info(f"data set ready in {data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

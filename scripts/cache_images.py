"""Decode and resize every image once, so that training, validation and test read pixels, not JPEGs.

    python scripts/cache_images.py                                    # DATA_DIR, all splits, BLIP-base's input size
    python scripts/cache_images.py --data-dir /scratch/vizwiz --splits train val --workers 15

Per split it writes `<split>-<W>x<H>-<filter>.npy` (uint8 RGB pixels, [images, H, W, 3]) and its
`.json` index into `<data-dir>/cache/` (or CACHE_DIR, or --cache-dir), where the datasets find it
by themselves: the pixels are bit-identical to decoding the JPEG, and an image changed since
caching (another size or mtime) is decoded from its file again. The input size and filter come
from the checkpoint's processor; BLIP-base and BLIP-large share one cache (384x384, bicubic).
"""
import argparse
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.base import constants as C  # noqa: E402
from src.base.cli import ArgumentParser  # noqa: E402
from src.base.data import (BadImage, ImageTransform, cache_files, default_cache_dir, default_num_workers,  # noqa: E402
                           file_signature, load_split)
from src.base.helpers import exit_on_user_error, log, setup_logging, write_json_atomic  # noqa: E402
from src.base.families import load_family  # noqa: E402

_worker = {}  # in each worker process: the transform and the pixel array being filled


def _start_worker(transform, pixels_path):
    _worker["transform"] = transform
    _worker["pixels"] = np.load(pixels_path, mmap_mode="r+")


def _cache_one(job):
    """Decode and resize one image straight into its row; returns its index entry."""
    row, path = job
    transform = _worker["transform"]
    entry = {"source": file_signature(path)}  # taken first: a file rewritten meanwhile reads as stale
    try:
        _worker["pixels"][row] = np.asarray(transform.resized(transform.load(path)))
        entry["row"] = row
    except BadImage as error:
        entry["bad"] = str(error).removeprefix(f"{path}: ")
    return path.name, entry


def _fill(pixels_path, transform, records, workers, desc):
    jobs = [(row, record.path) for row, record in enumerate(records)]
    bar = {"total": len(jobs), "desc": desc, "mininterval": 0.5 if sys.stderr.isatty() else 60}
    if workers == 0:
        _start_worker(transform, pixels_path)
        try:
            return dict(tqdm(map(_cache_one, jobs), **bar))
        finally:
            _worker.clear()
    with multiprocessing.Pool(workers, _start_worker, (transform, pixels_path)) as pool:
        return dict(tqdm(pool.imap_unordered(_cache_one, jobs, chunksize=16), **bar))


def build_cache(records, transform, cache_dir, split, workers=0):
    """Cache `records`' images (one split) in `cache_dir`; returns the index. 0 workers: in this process.

    The array is written under a temporary name and renamed into place, and the index is
    written last (the old one removed first), so an interrupted run leaves no cache to be used.
    """
    pixels_path, index_path = cache_files(cache_dir, split, transform.size, transform.resample)
    pixels_path.parent.mkdir(parents=True, exist_ok=True)
    index_path.unlink(missing_ok=True)
    tmp_path = pixels_path.with_name(pixels_path.name + ".tmp")
    width, height = transform.size
    shape = (len(records), height, width, 3)
    np.lib.format.open_memmap(tmp_path, mode="w+", dtype=np.uint8, shape=shape)  # the workers fill its rows
    entries = _fill(tmp_path, transform, records, workers, f"caching {split}")
    with open(tmp_path, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp_path, pixels_path)
    index = {"rows": len(records), "size": [width, height], "resample": transform.resample.name,
             "images": entries}
    write_json_atomic(index_path, index)
    return index


@exit_on_user_error
def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=C.DATA_DIR, help="VizWiz root (annotations/ and train/ val/ test/)")
    parser.add_argument("--checkpoint", default=C.FT_CHECKPOINT, help="its processor gives the input size and filter")
    parser.add_argument("--splits", nargs="+", choices=["train", "val", "test"], default=["train", "val", "test"])
    parser.add_argument("--workers", type=int, default=default_num_workers(), help="decoding processes (0: this one)")
    parser.add_argument("--cache-dir", help="default: CACHE_DIR, or <data-dir>/cache (where training looks)")
    args = parser.parse_args(argv)
    setup_logging()
    splits = {split: load_split(args.data_dir, split, drop_rejected=False, drop_precanned=False) for split in args.splits}
    transform = ImageTransform(load_family(args.checkpoint).processor.image_processor)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir(args.data_dir)
    for split, records in splits.items():
        start = time.perf_counter()
        index = build_cache(records, transform, cache_dir, split, args.workers)
        seconds = time.perf_counter() - start
        bad = sum("bad" in entry for entry in index["images"].values())
        pixels_path = cache_files(cache_dir, split, transform.size, transform.resample)[0]
        log.info(f"{split}: cached {len(records)} images ({bad} unreadable) in {seconds:.1f} s "
                 f"({1000 * seconds / max(1, len(records)):.1f} ms per image) -> {pixels_path} "
                 f"({pixels_path.stat().st_size / 1e9:.2f} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

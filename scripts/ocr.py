"""Read the text printed in every image of a split, once, for --ocr (src/base/ocr.py says what is kept).

    python scripts/ocr.py --data-dir D                          # train, val and test -> D/ocr/<split>.json
    python scripts/ocr.py --data-dir D --splits val --processes 8
    qsub -t 1-20 ... python scripts/ocr.py --data-dir D         # an SGE array job: task K of N reads 1 image in N

The engine is RapidOCR (rapidocr-onnxruntime, in requirements.txt): PaddleOCR's PP-OCRv4 text detector and
recogniser run by onnxruntime on the CPU, its models inside the wheel, so nothing is downloaded at run time.
Each worker (--processes on this machine, or each task of an array job: --shard K/N, read from SGE_TASK_ID and
SGE_TASK_LAST by default) keeps what it has read in D/ocr/<split>.part-K-of-N.json, saved atomically every
--save-every seconds and when stopped (Ctrl-C, SIGTERM, SIGUSR1/2: exit status 99); rerun the same command to go on
where it stopped. The worker that finds every part complete merges them into D/ocr/<split>.json.
"""
import argparse
import json
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.base import constants as C  # noqa: E402
from src.base.budget import format_duration  # noqa: E402
from src.base.cli import ArgumentParser  # noqa: E402
from src.base.data import BadImage, default_num_workers, load_image, load_split  # noqa: E402
from src.base.helpers import UserError, exit_on_user_error, log, setup_logging, write_json_atomic  # noqa: E402
from src.base.jobs import StopSignals, ignore_stop_signals  # noqa: E402
from src.base.ocr import ENGINE, make_engine, ocr_path, read_text  # noqa: E402

EXIT_STOPPED = 99
_worker = {}  # in each worker process: its OCR engine


def engine_name():
    from importlib.metadata import version
    return f"{ENGINE} {version(ENGINE)}"


def _start_worker(threads, in_pool=True):
    if in_pool:
        ignore_stop_signals()  # the main process saves, then ends the pool
    _worker["engine"] = make_engine(threads)


def _read_one(job):
    image_id, path = job
    try:
        return image_id, read_text(_worker["engine"], load_image(path)), None
    except BadImage as error:
        return image_id, [], str(error)


def _read_all(todo, processes, threads):
    """(image id, boxes, error) of each job, in this process or in `processes` worker processes (a few images queued
    per process; a worker that dies raises BrokenProcessPool instead of hanging)."""
    if processes <= 1:
        _start_worker(threads, in_pool=False)
        yield from map(_read_one, todo)
        return
    pool = ProcessPoolExecutor(processes, initializer=_start_worker, initargs=(threads,))
    try:
        jobs, pending = iter(todo), set()
        while True:
            for job in jobs:
                pending.add(pool.submit(_read_one, job))
                if len(pending) >= 4 * processes:
                    break
            if not pending:
                return
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                yield future.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def part_path(data_dir, split, shard, shards):
    return ocr_path(data_dir, split).with_name(f"{split}.part-{shard}-of-{shards}.json")


def _load_part(path):
    """The images an OCR file (a part, or a split's whole file) holds: {str(image id): boxes}."""
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text())["images"])
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path}: unreadable OCR file ({error}); delete it to read its images again")


def read_shard(data_dir, split, records, shard, shards, processes, threads, save_every, stop, known):
    """Read the images of shard `shard` (1-based) of `shards` that neither its part file nor `known` (an earlier
    OCR file's images) holds; returns whether it is complete (else it was stopped)."""
    path = part_path(data_dir, split, shard, shards)
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = records[shard - 1::shards]
    done = {**{str(r.image_id): known[str(r.image_id)] for r in mine if str(r.image_id) in known}, **_load_part(path)}
    todo = [(r.image_id, r.path) for r in mine if str(r.image_id) not in done]
    if done:
        log.info(f"{path}: {len(done)} images already read, {len(todo)} to go")

    def save(complete):
        write_json_atomic(path, {"engine": engine_name(), "split": split, "shard": [shard, shards],
                                 "complete": complete, "images": done})

    if not todo:
        save(True)
        return True
    from src.base.progress import ProgressBar
    started, saved_at, bad = time.perf_counter(), time.perf_counter(), 0
    desc = f"OCR {split}" + (f" (shard {shard}/{shards})" if shards > 1 else "")
    results = _read_all(todo, processes, threads)
    try:
        with ProgressBar(len(mine), desc, "image", initial=len(mine) - len(todo)) as bar:
            for image_id, boxes, error in results:
                done[str(image_id)] = boxes
                if error:
                    bad += 1
                    log.warning(f"unreadable image, no text: {error}")
                bar.update()
                if stop.received:
                    break
                if time.perf_counter() - saved_at >= save_every:
                    save(False)
                    saved_at = time.perf_counter()
    except BrokenProcessPool:
        raise UserError(f"{desc}: an OCR process died (out of memory?); what was read is saved in {path}: rerun the "
                        f"same command to go on")
    finally:  # a stop signal, Ctrl-C, a dead process: keep what was read
        results.close()
        complete = len(done) >= len(mine) and all(str(r.image_id) in done for r in mine)
        save(complete)
    seconds = time.perf_counter() - started
    read = len(todo) if complete else None
    if read:
        log.info(f"{desc}: read {read} images in {format_duration(seconds)} with {processes} process(es) of "
                 f"{threads} thread(s): {read / seconds:.2f} images/s, {seconds * processes / read:.2f} s of a "
                 f"process per image ({bad} unreadable) -> {path}")
    return complete


def merge(data_dir, split, records, shards):
    """Write D/ocr/<split>.json from every part, once all are complete; returns whether it was written."""
    parts = [part_path(data_dir, split, k, shards) for k in range(1, shards + 1)]
    images = {}
    for path in parts:
        if not path.is_file():
            return False
        content = json.loads(path.read_text())
        if not content.get("complete"):
            return False
        images.update(content["images"])
    out = ocr_path(data_dir, split)
    write_json_atomic(out, {"engine": engine_name(), "split": split,
                            "images": {str(r.image_id): images[str(r.image_id)] for r in records}})
    for path in parts:
        path.unlink(missing_ok=True)
    with_text = sum(bool(images[str(r.image_id)]) for r in records)
    log.info(f"{out}: text found on {with_text} of {len(records)} {split} images")
    return True


def default_shard():
    """(K, N) of an SGE array job's task (SGE_TASK_ID, SGE_TASK_FIRST..SGE_TASK_LAST), else (1, 1)."""
    task = os.environ.get("SGE_TASK_ID", "undefined")
    if task == "undefined" or not task:
        return 1, 1
    first, last = int(os.environ.get("SGE_TASK_FIRST", 1)), int(os.environ.get("SGE_TASK_LAST", task))
    return int(task) - first + 1, last - first + 1


def parse_shard(text):
    try:
        shard, shards = map(int, text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N (e.g. 3/20), got {text!r}")
    if not 1 <= shard <= shards:
        raise argparse.ArgumentTypeError(f"K/N needs 1 <= K <= N, got {text!r}")
    return shard, shards


@exit_on_user_error
def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=C.DATA_DIR, help="VizWiz root (annotations/ and train/ val/ test/)")
    parser.add_argument("--splits", nargs="+", choices=["train", "val", "test"], default=["train", "val", "test"])
    parser.add_argument("--processes", type=int, default=max(1, default_num_workers() + 1),
                        help="OCR processes on this machine, one image each at a time (default: the CPU cores "
                             "granted, NSLOTS under SGE)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads per process")
    parser.add_argument("--shard", type=parse_shard, default=default_shard(), metavar="K/N",
                        help="read only images K, K+N, K+2N, ... (default: the SGE array task, else 1/1)")
    parser.add_argument("--save-every", type=float, default=60, help="seconds between saves of what was read")
    args = parser.parse_args(argv)
    setup_logging()
    shard, shards = args.shard
    log.info(f"OCR with {engine_name()} on {args.data_dir}: {', '.join(args.splits)}"
             + (f", shard {shard} of {shards}" if shards > 1 else ""))
    with StopSignals() as stop:
        for split in args.splits:
            records = load_split(args.data_dir, split, drop_rejected=False, drop_precanned=False)
            known = _load_part(ocr_path(args.data_dir, split))  # a split read before: only new images are read
            if all(str(r.image_id) in known for r in records):
                log.info(f"{ocr_path(args.data_dir, split)}: every {split} image already read (delete it to read "
                         f"them again)")
                continue
            if not read_shard(args.data_dir, split, records, shard, shards, args.processes, args.threads,
                              args.save_every, stop, known):
                log.info(f"stopped ({stop.received or 'interrupted'}); what was read is saved: rerun the same "
                         f"command to go on")
                return EXIT_STOPPED
            if not merge(args.data_dir, split, records, shards):
                log.info(f"{split}: shard {shard} of {shards} done; the last shard to finish writes "
                         f"{ocr_path(args.data_dir, split)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""An ensemble of runs: pool the candidate captions that several runs' `test` wrote, and write each image's caption
chosen by consensus over the pool: the highest mean CIDEr-D against the other runs' candidates, each run weighed
alike (a run's candidates agreeing with each other count for nothing; see CiderD.consensus).

    python scripts/ensemble.py results/ft results/peft results/ft-git --split val     # scores it on val
    python scripts/ensemble.py results/ft results/peft results/ft-git                 # test_captions.json

Each run needs <split>_candidates.json, which every `python -m src.<ft|peft>.test --output-dir RUN [--split val]`
writes (its beam n-best, or its --mbr candidates). The runs may be of any family (BLIP, GIT, BLIP-2): candidates
are text, so no vocabulary is shared. CIDEr-D uses the document frequencies of the training captions, as the SCST
reward does (--data-dir; default: the data set the first run captioned). Writes <split>_captions.json (the format
`test` writes and `python -m src.base.evaluate --check-submission` checks) and <split>_candidates.json (the pool,
so an ensemble can join another) in --output-dir (default: results/ensemble); with --split val also
val_scores.json, and a table of each run's own validation CIDEr-D next to the ensemble's.
"""
import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from src.base import consensus  # noqa: E402
from src.base import constants as C  # noqa: E402
from src.base.cli import ArgumentParser  # noqa: E402
from src.base.data import load_split, with_captions  # noqa: E402
from src.base.evaluate import format_scores, score_captions  # noqa: E402
from src.base.helpers import UserError, exit_on_user_error, log, setup_logging, write_json_atomic  # noqa: E402

DEFAULT_OUTPUT = Path(C.RESULTS_DIR) / "ensemble"


def recorded_data_dir(run, split):
    """The data set the run's candidates file says it captioned, if the file can be read."""
    try:
        return json.loads(consensus.candidates_file(run, split).read_text()).get("data_dir")
    except (OSError, ValueError, AttributeError):
        return None


@exit_on_user_error
def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories holding <split>_candidates.json")
    parser.add_argument("--split", choices=["test", "val"], default="test")
    parser.add_argument("--data-dir", help="the data set (VizWiz layout) the runs captioned (default: the one the "
                                           "first run's candidates file names, else DATA_DIR)")
    parser.add_argument("--output-dir", default=str(DEFAULT_OUTPUT),
                        help=f"where the ensemble's files go (default: {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    setup_logging()
    if len(args.runs) < 2:
        raise UserError("give two or more run directories to ensemble")
    data_dir = args.data_dir or recorded_data_dir(args.runs[0], args.split) or C.DATA_DIR
    records = load_split(data_dir, args.split, C.DROP_REJECTED, C.DROP_PRECANNED)
    if args.split == "val":
        records = with_captions(records)  # the images test --split val captions: those with references
    annotations = Path(data_dir) / "annotations" / f"{args.split}.json"
    ids = [r.image_id for r in records]
    runs = [consensus.read(consensus.candidates_file(run, args.split), args.split, ids, annotations)
            for run in args.runs]

    pool = {i: [{**c, "run": str(run)} for run, images in zip(args.runs, runs) for c in images[i]["candidates"]]
            for i in ids}
    groups = {i: [c["run"] for c in pool[i]] for i in ids}
    images = consensus.pick(records, pool, consensus.training_cider(data_dir, C.DROP_REJECTED, C.DROP_PRECANNED),
                            groups)

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    captions_file = output_dir / f"{args.split}_captions.json"
    write_json_atomic(captions_file, [{"image_id": image["image_id"], "caption": image["caption"]} for image in images])
    consensus.write(consensus.candidates_file(output_dir, args.split), args.split, images, data_dir=str(data_dir),
                    runs=[str(run) for run in args.runs],
                    chosen_by=f"ensemble consensus, among the {C.MBR_CHOOSE_FROM}")
    sources = Counter(next(c["run"] for c in image["candidates"] if c["caption"] == image["caption"])
                      for image in images)
    log.info(f"wrote {len(images)} captions chosen by consensus over the candidates of {len(args.runs)} runs to "
             f"{captions_file}; captions taken from (a caption several runs wrote counts for the first): "
             + ", ".join(f"{run} {sources[str(run)]}" for run in args.runs))
    if args.split == "val":
        references = {r.image_id: r.captions for r in records}
        scores, _, tokenizer = score_captions(references, {image["image_id"]: image["caption"] for image in images})
        write_json_atomic(output_dir / "val_scores.json", {"runs": [str(run) for run in args.runs], **scores,
                                                            "tokenizer": tokenizer, "images": len(references)})
        log.info(f"ensemble validation scores: {format_scores(scores)}")
        print("| run | candidates per image | val CIDEr-D |\n|---|---|---|")
        for run, images_of_run in zip(args.runs, runs):
            own, _, _ = score_captions(references, {i: images_of_run[i]["caption"] for i in ids}, meteor=False)
            print(f"| {run} | {len(images_of_run[ids[0]]['candidates']) if ids else 0} | {own['CIDEr']:.4f} |")
        print(f"| ensemble of {len(args.runs)} | {len(pool[ids[0]]) if ids else 0} | {scores['CIDEr']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The train / resume / test commands, shared by src.ft and src.peft (which only pass their Method)."""
import functools
import json
import os
from pathlib import Path

from . import config as run_config
from . import constants as C
from . import consensus, decoding, ocr
from .checkpoint import BEST_DIR, STATE_DIR, best_model_dir, has_training_state, weights_fingerprint
from .data import ImageTransform, load_split, with_captions
from .budget import parse_time_limit
from .distributed import Processes, check_device, main_process
from .engine import EXIT_STOPPED, Interrupted, Trainer, caption_in_shares, describe_run
from .evaluate import format_scores, score_captions
from .helpers import UserError, exit_on_user_error, log, seed_everything, setup_logging, write_json_atomic
from .jobs import StopSignals, current_job, is_requeue_of
from .families import apply_recipe, load_family
from .modeling import to_device
from .precision import captioning_weights, describe_weights, resolve_precision, set_tf32
from .profiling import find_batch_size

def _output_dir(method, args):
    return Path(args.output_dir or run_config.defaults(method)["output_dir"])


def _time_limit(args):
    """--time-limit, else TIME_LIMIT, in seconds (None: no limit); a job's own setting, not saved with the run."""
    if args.time_limit is not None:
        return parse_time_limit(args.time_limit)
    return parse_time_limit(C.TIME_LIMIT, "TIME_LIMIT")


def _start(method, args, saved, log_name, resuming=False):
    """Check the device (a job that asked for a GPU stops here if torch sees none), resolve the configuration (when
    `resuming` the run `saved`, only the flags a resume may change), check the output directory is writable, log to
    it."""
    check_device(args.allow_cpu)
    resuming = resuming and saved is not None  # a state without its config.json: the flags given make the config
    config = run_config.resolve(method, args, saved, resuming)
    output_dir = Path(config.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UserError(f"--output-dir {output_dir}: cannot write there ({error.strerror or error})")
    setup_logging(output_dir / log_name if main_process() else None, quiet=not main_process())  # rank 0 logs
    return config


def _say_what_resuming_kept(config, saved, args):
    """Which given flags a resumed run ignored, and which it applied (after the log's first line)."""
    for note in run_config.resume_notes(config, saved, args):
        log.warning(note)


@exit_on_user_error
def train_main(method, argv=None):
    parser = run_config.training_parser(f"Train a BLIP captioner ({method.name}) on VizWiz-Captions.")
    parser.add_argument("--fresh", action="store_true",
                        help="start over even if --output-dir holds a run (deletes its state, metrics, best model, and "
                             "what test wrote with that model: captions, scores, tuned decoding); a requeued job "
                             "resumes the run its first start began instead")
    parser.add_argument("--find-batch-size", nargs="?", type=int, const=256, metavar="START",
                        help="GPU, new runs: train with the largest --batch-size that fits, searched by halving from "
                             "START (256)")
    args = parser.parse_args(argv)
    with StopSignals() as stop:  # from here on a stop signal is a flag the run answers, also while the model loads
        time_limit = _time_limit(args)
        output_dir = _output_dir(method, args)
        saved = run_config.load_saved(output_dir)
        if saved:
            run_config.check_method(saved, method, output_dir)
        # SGE reruns a requeued job's command line as it was: its --fresh must not wipe what the job has done
        requeued = args.fresh and saved is not None and is_requeue_of(saved.get("job"))
        fresh = args.fresh and not requeued
        resuming = has_training_state(output_dir) and not fresh
        config = _start(method, args, saved if resuming else None, "train.log", resuming)
        if not resuming:
            config.job = current_job()
            if args.find_batch_size:
                if not main_process() or os.environ.get("WORLD_SIZE", "1") != "1":
                    raise UserError("--find-batch-size: search on one GPU (plain python -m ...), then launch the "
                                    "processes with the --batch-size it finds")
                config.batch_size = find_batch_size(method, config, start=args.find_batch_size)
        trainer = Trainer(method, config, fresh=fresh, time_limit=time_limit, stop=stop)
        if resuming and saved is not None:
            _say_what_resuming_kept(config, saved, args)
        if requeued and resuming:
            log.info(f"job {current_job()} was requeued: resuming the run it started in {output_dir} (--fresh starts "
                     f"over only at a job's first start)")
        elif resuming:
            log.info(f"{output_dir} holds a run: resuming it (pass --fresh to start over)")
        return _run(trainer)


@exit_on_user_error
def resume_main(method, argv=None):
    parser = run_config.training_parser(f"Continue a {method.name} run from its output directory.")
    args = parser.parse_args(argv)
    with StopSignals() as stop:
        time_limit = _time_limit(args)
        output_dir = _output_dir(method, args)
        saved = run_config.load_saved(output_dir)
        if saved is None or not has_training_state(output_dir):
            raise UserError(f"{output_dir}: no training state to resume (no {run_config.CONFIG_FILE} and "
                            f"{STATE_DIR}/); start a run with python -m src.{method.name}.train --output-dir {output_dir}")
        config = _start(method, args, saved, "train.log", resuming=True)
        trainer = Trainer(method, config, time_limit=time_limit, stop=stop)
        _say_what_resuming_kept(config, saved, args)
        return _run(trainer)


def _run(trainer):
    """Run the training. Under torchrun a process's exit status does not reach the job (torchrun exits 1 for any
    failure, and ends the other processes as soon as one exits): a run that stopped to be resumed (EXIT_STOPPED: a
    signal or --time-limit) also says so in the file named by STOPPED_FILE, which multi_gpu_train.sh sets, so that
    the job exits with 99 and SGE requeues it; no process exits before that note is written."""
    status = trainer.run()
    marker = os.environ.get("STOPPED_FILE")
    if status == EXIT_STOPPED and marker and trainer.processes.is_main:
        Path(marker).touch()
    trainer.processes.wait()
    return status


@exit_on_user_error
def test_main(method, argv=None):
    """Caption a split; a stop signal ends it early with EXIT_STOPPED (the requeued job captions it again)."""
    with StopSignals() as stop:
        try:
            return _test(method, argv, stop)
        except Interrupted:
            log.info(f"received {stop.received}: captioning stopped, nothing written; exiting with status "
                     f"{EXIT_STOPPED} (rerun the same command)")
            return EXIT_STOPPED


def _test(method, argv, stop):
    parser = run_config.training_parser(
        f"Caption the test (or val) split with a {method.name} run's best model. Training flags are accepted "
        f"(and ignored) so that one set of flags serves train, resume and test.",
        checkpoint_help=f"model to caption with: hub name or local directory (default: <output-dir>/{BEST_DIR})",
        batch_help="images per generate() call (default: the run's --eval-batch-size)")
    parser.add_argument("--split", choices=["test", "val"], default="test",
                        help="test: write test_captions.json for the challenge; val: caption and score the validation set")
    parser.add_argument("--tune-decoding", action="store_true",
                        help=f"with --split val: choose decoding (beams, caption length, length and repetition "
                             f"penalties) from a grid on {1 - decoding.HELD_OUT_FRACTION:.0%} of the validation images "
                             f"(--val-max-images to go faster), score the choice on the other "
                             f"{decoding.HELD_OUT_FRACTION:.0%}, write <output-dir>/{decoding.DECODING_FILE}; later "
                             f"test runs of the same model use its best setting; with --mbr N it also tries the best "
                             f"setting with consensus decoding over N candidates")
    parser.add_argument("--mbr", type=int, metavar="N",
                        help="consensus decoding: draw N candidate captions per image (the beam search's best "
                             "min(N, --num-beams), then samples) and write the one with the highest mean CIDEr-D "
                             "against the others (minimum Bayes risk; needs the training annotations); 0 = beam search")
    args = parser.parse_args(argv)
    if args.tune_decoding and args.split != "val":
        raise UserError("--tune-decoding chooses decoding on the validation set: add --split val")
    if args.batch_size is not None:  # on test, --batch-size is the captioning batch
        args.eval_batch_size, args.batch_size = args.batch_size, None
    output_dir = _output_dir(method, args)
    saved = run_config.load_saved(output_dir)
    config = _start(method, args, saved, "test.log")

    checkpoint = args.checkpoint or str(best_model_dir(output_dir))
    if not args.checkpoint and not Path(checkpoint).is_dir():
        raise UserError(f"{checkpoint}: no best model here; train first (python -m src.{method.name}.train) "
                        f"or pass --checkpoint")
    processes = Processes()  # under accelerate launch / torchrun each process captions a share
    device = processes.device
    precision = resolve_precision(config.precision, device)
    set_tf32(precision, config.tf32, device)
    recipe = apply_recipe(config, method, checkpoint)  # a run's saved config has them all; a bare checkpoint not
    family = load_family(checkpoint, config.prompt)
    log.info(describe_run(f"src.{method.name}.test: captioning the {args.split} split", checkpoint, config, family,
                          device, precision, processes.world))
    for line in recipe:
        log.info(line)
    model = method.load_best(checkpoint)
    family.use_image_size(model, config.image_size)
    model = captioning_weights(to_device(model, device), precision)
    log.info(describe_weights(model, precision))
    if not args.tune_decoding:  # after loading: a hub checkpoint's files are in the cache then
        decoding.apply_saved(config, output_dir, {k for k in decoding.KEYS if getattr(args, k) is not None}, checkpoint)
    records = load_split(config.data_dir, args.split, config.drop_rejected, config.drop_precanned)
    if args.split == "val":
        records = with_captions(records)
    if config.ocr:
        ocr.attach_ocr(records, config.data_dir, args.split, config.ocr_min_confidence)
    transform = ImageTransform(family.processor.image_processor, use_draft=not config.exact_preprocessing)
    references = {r.image_id: r.captions for r in records}

    cider = functools.cache(lambda: consensus.training_cider(config.data_dir, config.drop_rejected,
                                                             config.drop_precanned))

    def caption(settings, records=records):
        """(the images of the candidates file, bad images): each image's candidates and the caption written, the top
        beam or with --mbr their consensus."""
        seed_everything(config.seed)  # the samples of --mbr: the same captions each time
        drawn, bad = caption_in_shares(processes, model, records, transform, family, settings, device, precision,
                                       f"captioning {args.split}", candidates=True,
                                       stop=lambda: processes.sum([bool(stop.received)])[0] > 0)
        return consensus.pick(records, drawn, cider() if settings.mbr else None), bad

    if config.mbr:
        cider()  # before captioning: without the training annotations it stops now, not after the pass
        if min(config.mbr, config.num_beams) < 2 and C.MBR_CHOOSE_FROM == "beams" and not args.tune_decoding:
            log.warning(f"--mbr {config.mbr} with {config.num_beams} beam: samples only vote "
                        f"(MBR_CHOOSE_FROM=beams), so the one beam is written; give --num-beams 2 or more")
    if args.tune_decoding:
        return _tune_decoding(config, output_dir, checkpoint, records, references, caption, processes)
    log.info(f"captioning {len(records)} {args.split} images with {checkpoint} "
             f"({decoding.describe(decoding.current(config))}, batch {config.eval_batch_size}, precision {precision})")
    images, bad = caption(config)
    if not processes.is_main:
        return 0
    captions = [{"image_id": image["image_id"], "caption": image["caption"]} for image in images]
    predictions = {c["image_id"]: c["caption"] for c in captions}
    out_file = output_dir / f"{args.split}_captions.json"
    write_json_atomic(out_file, captions)
    log.info(f"wrote {len(captions)} captions to {out_file}" + (f" ({len(bad)} unreadable images got a blank-image caption)" if bad else ""))
    candidates_file = consensus.candidates_file(output_dir, args.split)
    consensus.write(candidates_file, args.split, images, data_dir=config.data_dir, checkpoint=checkpoint,
                    family=family.name, decoding=decoding.current(config),
                    chosen_by=f"consensus, among the {C.MBR_CHOOSE_FROM}" if config.mbr else "beam search")
    chosen = (f"; consensus chose another caption than the top beam for {consensus.changed(images)} of {len(images)} "
              f"images" if config.mbr else "")
    log.info(f"wrote every image's {len(images[0]['candidates']) if images else 0} candidates to {candidates_file}"
             f"{chosen}")
    if args.split == "val":
        scores, _, tokenizer = score_captions(references, predictions)
        write_json_atomic(output_dir / "val_scores.json", {"checkpoint": checkpoint, **scores, "tokenizer": tokenizer,
                                                              "images": len(references)})
        log.info(f"validation scores: {format_scores(scores)}")
        print(json.dumps(scores))
    return 0


def _tune_decoding(config, output_dir, checkpoint, records, references, caption, processes):
    """Choose decoding on part of the validation images (the first --val-max-images), score the choice and the run's
    own setting on the rest, write decoding.json with the fingerprint of the weights."""
    if config.val_max_images > 0:
        records = records[: config.val_max_images]
    tuning, held_out = decoding.split_held_out(records)
    fingerprint, why = weights_fingerprint(checkpoint)
    if fingerprint is None:
        raise UserError(f"--checkpoint {checkpoint}: cannot fingerprint its weights ({why}), so no later test run "
                        f"could tell that it is the model tuned on")
    log.info(f"tuning decoding with {checkpoint} on {len(tuning)} validation images; {len(held_out)} others "
             f"({decoding.HELD_OUT_FRACTION:.0%}) are held out to score the choice")
    tokenizers = []

    def on(part):
        """(caption, score) on the images `part`: every process gets the main process's CIDEr-D, so all choose alike."""
        part_references = {r.image_id: references[r.image_id] for r in part}

        def score(predictions):
            scores, _, tokenizer = (score_captions(part_references, predictions, meteor=False) if processes.is_main
                                    else ({}, {}, None))
            tokenizers.append(tokenizer)
            return processes.sum([scores.get("CIDEr", 0.0)])[0]
        return (lambda settings: {image["image_id"]: image["caption"] for image in caption(settings, part)[0]}), score

    mbr, config.mbr = config.mbr, 0  # --mbr N: an option to try, not the run's own setting
    default = decoding.current(config)
    rows = decoding.tune(*on(tuning), config, mbr)
    held_out_scores = decoding.score_held_out(*on(held_out), config, decoding.setting(rows[0]), default)
    if processes.is_main:
        tuned = decoding.save(output_dir, fingerprint, checkpoint, tokenizers[-1], rows, default, tuning, held_out,
                              held_out_scores)
        table, summary = decoding.report(tuned)
        log.info(f"decoding settings, best first:\n{table}")
        log.info(f"{summary}; written to {output_dir / decoding.DECODING_FILE}: later test runs of this model use it")
    return 0

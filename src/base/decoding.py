"""Decoding chosen on validation: `test --split val --tune-decoding` scores a small grid of generate() settings
and writes `decoding.json` in the run's directory; later `test` runs of the same model use its best setting unless
flags say otherwise.

CIDEr-D is sensitive to caption length and beam settings (course runs gained up to 11 CIDEr-D from beam
search alone on GIT), so the settings are chosen on the validation set, never on the test set. The best of 21
scores on the images it was chosen on is optimistic, so part of the validation images is held out of the choice
and scores it. decoding.json records a fingerprint of the weights it was tuned on: a model trained again, or another
--checkpoint, does not inherit it.
"""
import hashlib
import json
from pathlib import Path

from .checkpoint import DECODING_FILE, weights_fingerprint
from .helpers import UserError, log, write_json_atomic

GENERATE_KEYS = ("num_beams", "min_new_tokens", "max_new_tokens", "length_penalty", "repetition_penalty")
KEYS = GENERATE_KEYS + ("mbr",)  # and the number of candidates consensus decoding chooses from (0: beam search)
HELD_OUT_FRACTION = 0.25  # of the validation images tuned on: not used to choose, only to score the choice


def grid():
    """20 settings: greedy with and without a repetition penalty, and beams 3 and 5 crossed with caption length
    limits and length / repetition penalties (VizWiz references run about 8-15 words)."""
    settings = [dict(num_beams=1, min_new_tokens=5, max_new_tokens=30, length_penalty=1.0, repetition_penalty=r,
                     mbr=0) for r in (1.0, 1.3)]
    for beams in (3, 5):
        for low, high in ((5, 20), (5, 30), (8, 30)):
            for length_penalty, repetition_penalty in ((1.0, 1.0), (2.0, 1.0), (1.0, 1.3)):
                settings.append(dict(num_beams=beams, min_new_tokens=low, max_new_tokens=high,
                                     length_penalty=length_penalty, repetition_penalty=repetition_penalty, mbr=0))
    return settings


def current(config):
    return {key: getattr(config, key) for key in KEYS}


def setting(row):
    return {key: row[key] for key in KEYS}


def use(config, settings):
    for key, value in settings.items():
        setattr(config, key, value)


def split_held_out(records):
    """(tuning, held-out): HELD_OUT_FRACTION of `records` (at least one) held out, chosen by a hash of the image id,
    so the split depends only on which images there are, not on their order in the file."""
    if len(records) < 2:
        raise UserError(f"--tune-decoding needs at least 2 validation images (one to choose on, one held out to "
                        f"score the choice); there are {len(records)} (--val-max-images?)")
    by_hash = sorted(records, key=lambda r: hashlib.sha256(str(r.image_id).encode()).hexdigest())
    held_out = {r.image_id for r in by_hash[: max(1, round(len(records) * HELD_OUT_FRACTION))]}
    return [r for r in records if r.image_id not in held_out], [r for r in records if r.image_id in held_out]


def tune(caption, score, config, mbr=0):
    """Score the run's own setting and every grid setting on the tuning images, and with `mbr` (test --mbr N) then
    the best of those with consensus decoding over N candidates (one pass more). `caption(config)` ->
    {image_id: caption}; `score(predictions)` -> CIDEr-D. Returns the rows (setting + tuning_CIDEr), best first."""
    candidates = [current(config)] + [s for s in grid() if s != current(config)]
    total = len(candidates) + bool(mbr)
    rows = []

    def try_setting(candidate):
        use(config, candidate)
        rows.append({**candidate, "tuning_CIDEr": score(caption(config))})
        log.info(f"decoding {len(rows)}/{total}: {describe(candidate)}: tuning CIDEr-D {rows[-1]['tuning_CIDEr']:.4f}")

    for candidate in candidates:
        try_setting(candidate)
    if mbr:
        best = max(rows, key=lambda row: row["tuning_CIDEr"])
        try_setting({**setting(best), "mbr": mbr})
    return sorted(rows, key=lambda row: -row["tuning_CIDEr"])


def score_held_out(caption, score, config, best, default):
    """CIDEr-D of the chosen setting and of the run's own on the held-out images (one pass when they are the same)."""
    use(config, best)
    scores = {"best": score(caption(config))}
    if default == best:
        scores["run_setting"] = scores["best"]
    else:
        use(config, default)
        scores["run_setting"] = score(caption(config))
    return scores


def describe(settings):
    consensus = f", consensus of {settings['mbr']} candidates" if settings.get("mbr") else ""
    return (f"beams {settings['num_beams']}, new tokens {settings['min_new_tokens']}-{settings['max_new_tokens']}, "
            f"length penalty {settings['length_penalty']}, repetition penalty {settings['repetition_penalty']}"
            f"{consensus}")


def report(tuned):
    """The table of every setting tried and the summary line, from the contents of decoding.json."""
    tuning, held_out = len(tuned["tuning_images"]), len(tuned["held_out_images"])
    lines = [f"| | beams | min new | max new | length penalty | repetition penalty | MBR candidates | "
             f"tuning CIDEr-D ({tuning} images) | held-out CIDEr-D ({held_out} images) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i, row in enumerate(tuned["settings"]):
        marks = (["chosen"] if i == 0 else []) + (["run's"] if setting(row) == tuned["run_setting"] else [])
        held = tuned["held_out_CIDEr"]["best" if i == 0 else "run_setting"] if marks else None
        lines.append(f"| {', '.join(marks)} | {row['num_beams']} | {row['min_new_tokens']} | {row['max_new_tokens']} | "
                     f"{row['length_penalty']} | {row['repetition_penalty']} | {row.get('mbr') or '-'} | "
                     f"{row['tuning_CIDEr']:.4f} | "
                     f"{'' if held is None else f'{held:.4f}'} |")
    own = next(row for row in tuned["settings"] if setting(row) == tuned["run_setting"])
    summary = (f"chosen decoding: {describe(tuned['best'])}. Held-out CIDEr-D (the {held_out} validation images "
               f"not used to choose): {tuned['held_out_CIDEr']['best']:.4f}, the run's own setting "
               f"{tuned['held_out_CIDEr']['run_setting']:.4f}. Tuning CIDEr-D (the {tuning} images it was chosen on, "
               f"optimistic): {tuned['settings'][0]['tuning_CIDEr']:.4f}, the run's own {own['tuning_CIDEr']:.4f}")
    return "\n".join(lines), summary


def save(output_dir, fingerprint, checkpoint, tokenizer, rows, default, tuning, held_out, held_out_scores):
    """Write decoding.json; returns its contents."""
    tuned = {"model_fingerprint": fingerprint, "checkpoint": checkpoint, "tokenizer": tokenizer,
             "best": setting(rows[0]), "run_setting": default, "held_out_CIDEr": held_out_scores,
             "held_out_fraction": HELD_OUT_FRACTION, "tuning_images": sorted(r.image_id for r in tuning),
             "held_out_images": sorted(r.image_id for r in held_out), "settings": rows}
    write_json_atomic(Path(output_dir) / DECODING_FILE, tuned)
    return tuned


def apply_saved(config, output_dir, given, checkpoint):
    """Use the best setting of `output_dir/decoding.json`, if there is one and it was tuned on the weights of
    `checkpoint`, for the keys not in `given` (flags); if it was not, say in one line why it is ignored."""
    path = Path(output_dir) / DECODING_FILE
    if not path.is_file() or set(given) >= set(KEYS):
        return
    try:
        saved = json.loads(path.read_text())
        best = {key: saved["best"][key] for key in GENERATE_KEYS} | {"mbr": saved["best"].get("mbr", 0)}  # older: 0
        tuned_on = saved.get("model_fingerprint")
        held_out = saved["held_out_CIDEr"]["best"] if tuned_on else None
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path}: not a decoding file written by --tune-decoding ({error}); delete it or tune again")
    retune = "decoding with the run's own settings; tune again with --split val --tune-decoding"
    if tuned_on is None:
        log.warning(f"{path} ignored: written by an older version that did not record which weights it was tuned "
                    f"on; {retune}")
        return
    fingerprint, why = weights_fingerprint(checkpoint)
    if fingerprint != tuned_on:
        reason = (f"cannot fingerprint the weights of {checkpoint} ({why})" if fingerprint is None else
                  f"it was tuned on other weights than {checkpoint}'s (trained again since, or another --checkpoint)")
        log.warning(f"{path} ignored: {reason}; {retune}")
        return
    use(config, {key: value for key, value in best.items() if key not in given})
    overridden = f"; flags override {', '.join(sorted(given))}" if given else ""
    log.info(f"decoding from {path} (tuned on these weights; held-out CIDEr-D {held_out:.4f}): "
             f"{describe(current(config))}{overridden}")

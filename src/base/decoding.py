"""Decoding chosen on validation: `test --split val --tune-decoding` scores a small grid of generate() settings
and writes `decoding.json` in the run's directory; later `test` runs use its best setting unless flags say otherwise.

CIDEr-D is sensitive to caption length and beam settings (course runs gained up to 11 CIDEr-D from beam
search alone on GIT), so the settings are chosen on the validation set, never on the test set.
"""
import json
from pathlib import Path

from .helpers import UserError, log, write_json_atomic

DECODING_FILE = "decoding.json"
KEYS = ("num_beams", "min_new_tokens", "max_new_tokens", "length_penalty", "repetition_penalty")


def grid():
    """20 settings: greedy with and without a repetition penalty, and beams 3 and 5 crossed with caption length
    limits and length / repetition penalties (VizWiz references run about 8-15 words)."""
    settings = [dict(num_beams=1, min_new_tokens=5, max_new_tokens=30, length_penalty=1.0, repetition_penalty=r)
                for r in (1.0, 1.3)]
    for beams in (3, 5):
        for low, high in ((5, 20), (5, 30), (8, 30)):
            for length_penalty, repetition_penalty in ((1.0, 1.0), (2.0, 1.0), (1.0, 1.3)):
                settings.append(dict(num_beams=beams, min_new_tokens=low, max_new_tokens=high,
                                     length_penalty=length_penalty, repetition_penalty=repetition_penalty))
    return settings


def current(config):
    return {key: getattr(config, key) for key in KEYS}


def tune(caption, score, config):
    """Score the run's own setting and every grid setting. `caption(config)` -> {image_id: caption};
    `score(predictions)` -> CIDEr-D. Returns the rows (setting + CIDEr), best first."""
    candidates = [current(config)] + [s for s in grid() if s != current(config)]
    rows = []
    for number, setting in enumerate(candidates, 1):
        for key, value in setting.items():
            setattr(config, key, value)
        rows.append({**setting, "CIDEr": score(caption(config))})
        log.info(f"decoding {number}/{len(candidates)}: {describe(setting)}: CIDEr-D {rows[-1]['CIDEr']:.4f}")
    return sorted(rows, key=lambda row: -row["CIDEr"])


def describe(setting):
    return (f"beams {setting['num_beams']}, new tokens {setting['min_new_tokens']}-{setting['max_new_tokens']}, "
            f"length penalty {setting['length_penalty']}, repetition penalty {setting['repetition_penalty']}")


def table(rows, default):
    lines = ["| best | beams | min new | max new | length penalty | repetition penalty | val CIDEr-D |",
             "|---|---|---|---|---|---|---|"]
    for i, row in enumerate(rows):
        mark = "*" if i == 0 else ("(run's)" if {k: row[k] for k in KEYS} == default else "")
        lines.append(f"| {mark} | {row['num_beams']} | {row['min_new_tokens']} | {row['max_new_tokens']} | "
                     f"{row['length_penalty']} | {row['repetition_penalty']} | {row['CIDEr']:.4f} |")
    return "\n".join(lines)


def save(output_dir, rows, default, checkpoint, images, tokenizer):
    best = {k: rows[0][k] for k in KEYS}
    write_json_atomic(Path(output_dir) / DECODING_FILE, {
        "checkpoint": checkpoint, "validation_images": images, "tokenizer": tokenizer, "best": best,
        "best_CIDEr": rows[0]["CIDEr"], "run_setting": default, "settings": rows})


def apply_saved(config, output_dir, given):
    """Use the best setting of `output_dir/decoding.json`, if there is one, for the keys not in `given` (flags)."""
    path = Path(output_dir) / DECODING_FILE
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
        best = {key: saved["best"][key] for key in KEYS}
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path}: not a decoding file written by --tune-decoding ({error}); delete it or tune again")
    used = {key: value for key, value in best.items() if key not in given}
    for key, value in used.items():
        setattr(config, key, value)
    overridden = f"; flags override {', '.join(sorted(given))}" if given else ""
    log.info(f"decoding from {path} (validation CIDEr-D {saved.get('best_CIDEr', float('nan')):.4f}): "
             f"{describe(current(config))}{overridden}")

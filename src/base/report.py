"""What a person looks at after a run: example captions on their images, and the training curves."""
import json
import shutil
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .data import BadImage, load_image

EXAMPLE_WIDTH = 480


def pick_examples(records, per_image, n_best=5, n_worst=5, n_fixed=3):
    """(kind, record) pairs: the best and worst by per-image CIDEr-D, and a fixed spread of records."""
    ranked = sorted(records, key=lambda r: (per_image[r.image_id]["CIDEr"], -r.image_id), reverse=True)
    fixed = [records[i * (len(records) - 1) // max(n_fixed - 1, 1)] for i in range(min(n_fixed, len(records)))]
    return ([("best", r) for r in ranked[:n_best]] + [("worst", r) for r in ranked[::-1][:n_worst]]
            + [("fixed", r) for r in fixed])


def save_examples(out_dir, records, predictions, per_image):
    """Write one JPEG per example: the photo with the predicted caption, its CIDEr-D and the references."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for rank, (kind, record) in enumerate(pick_examples(records, per_image)):
        text = [f"predicted: {predictions[record.image_id]}",
                f"CIDEr-D {per_image[record.image_id]['CIDEr']:.3f}   image {record.image_id}", "references:"]
        text += [f"- {caption}" for caption in record.captions]
        _captioned(record.path, text).save(tmp / f"{kind}_{rank:02d}_{record.image_id}.jpg", quality=90)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def _photo(path, width):
    """The upright photo scaled to `width` pixels across (grey if unreadable)."""
    try:
        photo = load_image(path, (width, width))
        return photo.resize((width, max(1, round(photo.height * width / photo.width))))
    except BadImage:
        return Image.new("RGB", (width, width // 2), (128, 128, 128))


def _captioned(path, lines):
    photo = _photo(path, EXAMPLE_WIDTH)
    font = ImageFont.load_default(size=14)
    wrapped = [piece for line in lines for piece in textwrap.wrap(line, 60) or [""]]
    canvas = Image.new("RGB", (EXAMPLE_WIDTH, photo.height + 18 * len(wrapped) + 10), "white")
    canvas.paste(photo, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(wrapped):
        draw.text((6, photo.height + 5 + 18 * i), line, fill="black", font=font)
    return canvas


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def device_hours(row):
    """GPU-hours (device-hours on the CPU) a run had spent at this metrics line; older runs lack the field."""
    if "device_hours" in row:
        return row["device_hours"]
    return row.get("elapsed_seconds", 0) * row.get("num_processes", 1) / 3600


def _hours_label(rows):
    device = rows[-1].get("device", "cuda") if rows else "cuda"
    return f"device-hours ({device})" if device == "cpu" else "GPU-hours"  # on GPUs, the GPU's name


def _plot_cider_vs_hours(axis, rows, **style):
    """One run's validation CIDEr-D against the GPU-hours spent, its best point circled."""
    axis.plot([device_hours(r) for r in rows], [r["CIDEr"] for r in rows], marker="o", **style)
    best = max(rows, key=lambda r: r["CIDEr"])
    axis.scatter([device_hours(best)], [best["CIDEr"]], s=120, facecolors="none", edgecolors="red")


def plot_curves(metrics_path, out_png):
    """Training loss and validation CIDEr-D against optimizer steps, and CIDEr-D against GPU-hours, one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    steps = [r["step"] for r in rows]
    fig, (loss_axis, cider_axis, cost_axis) = plt.subplots(1, 3, figsize=(15, 4))
    loss_axis.plot(steps, [r["train_loss"] for r in rows], marker="o")
    loss_axis.set(xlabel="step", ylabel="training loss (mean since previous evaluation)", title="training loss")
    cider_axis.plot(steps, [r["CIDEr"] for r in rows], marker="o", color="tab:green")
    best = max(rows, key=lambda r: r["CIDEr"])
    cider_axis.scatter([best["step"]], [best["CIDEr"]], s=120, facecolors="none", edgecolors="red", label="best")
    cider_axis.set(xlabel="step", ylabel="CIDEr-D", title="validation CIDEr-D")
    cider_axis.legend()
    _plot_cider_vs_hours(cost_axis, rows, color="tab:green")
    cost_axis.set(xlabel=_hours_label(rows), ylabel="CIDEr-D", title="validation CIDEr-D against compute")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def plot_sweep(runs, out_png, best=None):
    """Validation CIDEr-D against GPU-hours for several runs, one line each; `runs` is [(name, metrics rows)]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(name, rows) for name, rows in runs if rows]
    fig, axis = plt.subplots(figsize=(8, 5))
    for name, rows in runs:
        _plot_cider_vs_hours(axis, rows, label=f"{name} (best)" if name == best else name,
                             linewidth=3 if name == best else 1)
    axis.set(xlabel=_hours_label(runs[0][1] if runs else []), ylabel="validation CIDEr-D",
             title="validation CIDEr-D against compute (best of each run circled)")
    if runs:
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- an HTML page for several runs

def _data_uri(image, quality=85):
    import base64
    import io
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if image.mode == "RGB" else "PNG", quality=quality)
    kind = "jpeg" if image.mode == "RGB" else "png"
    return f"data:image/{kind};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def _curves_png(runs):
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_axis, cider_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        if run["metrics"]:
            steps = [r["step"] for r in run["metrics"]]
            loss_axis.plot(steps, [r["train_loss"] for r in run["metrics"]], marker="o", label=run["name"])
            cider_axis.plot(steps, [r["CIDEr"] for r in run["metrics"]], marker="o", label=run["name"])
    loss_axis.set(xlabel="step", ylabel="training loss", title="training loss")
    cider_axis.set(xlabel="step", ylabel="CIDEr-D", title="validation CIDEr-D")
    for axis in (loss_axis, cider_axis):
        axis.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer).convert("RGBA")


def load_run(run_dir):
    """What a run directory holds: config, metrics, validation scores and captions (each may be missing)."""
    run_dir = Path(run_dir)

    def read(name):
        path = run_dir / name
        return json.loads(path.read_text()) if path.is_file() else None
    metrics = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    return {"name": run_dir.name, "dir": run_dir, "config": read("config.json") or {}, "metrics": metrics,
            "val_scores": read("val_scores.json"), "val_captions": read("val_captions.json")}


def html_report(run_dirs, title="VizWiz captioning runs"):
    """One self-contained HTML page (images inlined) comparing `run_dirs`."""
    from html import escape

    from .data import load_split, with_captions
    from .evaluate import score_captions

    runs = [load_run(d) for d in run_dirs]
    columns = ["Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]
    rows = []
    for run in runs:
        best = max(run["metrics"], key=lambda r: r["CIDEr"]) if run["metrics"] else {}
        scores = run["val_scores"] or {}
        cells = [run["name"], run["config"].get("method", ""), run["config"].get("checkpoint", ""),
                 f"{best['CIDEr']:.4f} @ {best['step']}" if best else "",
                 str(run["metrics"][-1]["step"]) if run["metrics"] else "",
                 f"{run['metrics'][-1].get('elapsed_seconds', 0) / 3600:.2f}" if run["metrics"] else ""]
        cells += ["" if scores.get(c) is None else f"{scores[c]:.4f}" for c in columns]
        rows.append("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in cells) + "</tr>")
    header = ["run", "method", "checkpoint", "best val CIDEr-D @ step", "steps", "hours"] + [f"val {c}" for c in columns]
    parts = [f"<h1>{escape(title)}</h1>", '<table id="metrics"><thead><tr>'
             + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr></thead><tbody>" + "".join(rows)
             + "</tbody></table>"]
    if any(run["metrics"] for run in runs):
        parts.append(f'<h2>Curves</h2><img id="curves" alt="training loss and validation CIDEr-D" '
                     f'src="{_data_uri(_curves_png(runs))}">')
    for run in runs:
        if not run["val_captions"] or not run["config"].get("data_dir"):
            continue
        records = with_captions(load_split(run["config"]["data_dir"], "val", run["config"].get("drop_rejected", True),
                                           run["config"].get("drop_precanned", True)))
        predictions = {c["image_id"]: c["caption"] for c in run["val_captions"]}
        records = [r for r in records if r.image_id in predictions]
        _, per_image, _ = score_captions({r.image_id: r.captions for r in records}, predictions, meteor=False)
        parts.append(f'<h2>{escape(run["name"])}: validation examples</h2><section class="gallery">')
        for kind, record in pick_examples(records, per_image):
            references = "".join(f"<li>{escape(c)}</li>" for c in record.captions)
            parts.append(
                f'<figure class="example" data-kind="{kind}"><img src="{_data_uri(_photo(record.path, 320))}" '
                f'alt="image {record.image_id}"><figcaption><b>{kind}</b> · CIDEr-D '
                f'{per_image[record.image_id]["CIDEr"]:.3f} · image {record.image_id}<br>'
                f'<i>predicted:</i> {escape(predictions[record.image_id])}<ul>{references}</ul></figcaption></figure>')
        parts.append("</section>")
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
             "padding:4px 8px;font-size:14px}.gallery{display:flex;flex-wrap:wrap;gap:12px}figure{width:320px;margin:0}"
             "figcaption{font-size:13px}#curves{max-width:100%}")
    # after loading, the page records how many images decoded: a headless browser test reads it back
    script = ("window.addEventListener('load',()=>{document.body.dataset.imagesLoaded="
              "[...document.images].filter(i=>i.complete&&i.naturalWidth>0).length;});")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{escape(title)}</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}<script>{script}</script></body></html>")

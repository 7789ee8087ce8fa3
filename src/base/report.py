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


def _captioned(path, lines):
    try:
        photo = load_image(path)
        photo = photo.resize((EXAMPLE_WIDTH, max(1, round(photo.height * EXAMPLE_WIDTH / photo.width))))
    except BadImage:
        photo = Image.new("RGB", (EXAMPLE_WIDTH, EXAMPLE_WIDTH // 2), (128, 128, 128))
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


def plot_curves(metrics_path, out_png):
    """Training loss and validation CIDEr-D against optimizer steps, one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    steps = [r["step"] for r in rows]
    fig, (loss_axis, cider_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(steps, [r["train_loss"] for r in rows], marker="o")
    loss_axis.set(xlabel="step", ylabel="training loss (mean since previous evaluation)", title="training loss")
    cider_axis.plot(steps, [r["CIDEr"] for r in rows], marker="o", color="tab:green")
    best = max(rows, key=lambda r: r["CIDEr"])
    cider_axis.scatter([best["step"]], [best["CIDEr"]], s=120, facecolors="none", edgecolors="red", label="best")
    cider_axis.set(xlabel="step", ylabel="CIDEr-D", title="validation CIDEr-D")
    cider_axis.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)

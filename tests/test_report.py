"""The HTML report renders in a real browser (headless Chromium) with its table, curves and gallery."""
import json
import re
import shutil
import subprocess
import sys


from conftest import REPO
from src.base.data import load_split, with_captions

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                  "--disable-component-update", "--disable-sync", "--disable-quic", "--virtual-time-budget=10000"]


def _fake_run(root, name, demo_data, caption_of):
    """A run directory as training and `test --split val` leave it."""
    run = root / name
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"method": "ft", "checkpoint": "tiny", "data_dir": str(demo_data)}))
    rows = [{"step": s, "epoch": s / 30, "train_loss": 3.0 / s, "CIDEr": 0.01 * s, "elapsed_seconds": 6.0 * s}
            for s in (10, 20, 30)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = with_captions(load_split(demo_data, "val"))
    (run / "val_captions.json").write_text(json.dumps([{"image_id": r.image_id, "caption": caption_of(r)} for r in records]))
    (run / "val_scores.json").write_text(json.dumps({"Bleu_4": 0.1, "METEOR": None, "ROUGE_L": 0.4, "CIDEr": 0.3}))
    return run, len(records)


def test_report_renders_in_headless_chromium_with_table_curves_and_gallery(tmp_path, demo_data):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "headless Chromium is needed: apt-get install chromium (scripts/run_tests.sh does it)"
    run_a, images = _fake_run(tmp_path, "run-a", demo_data, lambda r: r.captions[0])
    run_b, _ = _fake_run(tmp_path, "run-b", demo_data, lambda r: "a picture of something")
    out = tmp_path / "report.html"
    result = subprocess.run([sys.executable, "scripts/report.py", str(run_a), str(run_b), "--out", str(out)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "src=\"http" not in out.read_text()  # self-contained: nothing fetched from a server

    dom = subprocess.run([browser, *CHROMIUM_FLAGS, "--dump-dom", out.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    table = re.search(r'<table id="metrics">.*?</table>', dom, re.S).group(0)
    assert len(re.findall(r"<tr>", table)) == 3  # header and two runs
    assert "run-a" in table and "run-b" in table
    figures = re.findall(r'<figure class="example" data-kind="(\w+)"', dom)
    assert figures.count("best") == 10 and figures.count("worst") == 10 and figures.count("fixed") == 6
    assert 'id="curves"' in dom
    loaded = int(re.search(r'data-images-loaded="(\d+)"', dom).group(1))
    assert loaded == len(figures) + 1  # every gallery image and the curves decoded in the browser
    assert images >= 13


def test_compute_axis_says_gpu_hours_for_a_named_gpu_and_device_hours_on_the_cpu():
    from src.base.report import _hours_label, device_hours
    gpu_rows = [{"device": "NVIDIA H100 80GB HBM3", "device_hours": 0.5}]  # metrics.jsonl names the GPU
    assert _hours_label(gpu_rows) == "GPU-hours"
    assert _hours_label([{"device": "cpu"}]) == "device-hours (cpu)"
    assert device_hours({"elapsed_seconds": 7200, "num_processes": 2}) == 4.0  # an older line without the field

"""The benchmark script runs end to end (tiny shapes) and reports every comparison it promises."""
import json
import subprocess
import sys

from conftest import REPO


def test_benchmark_runs_and_writes_json(tmp_path):
    """With its default real photos and tokenizer, which the repository carries (tests/fixtures)."""
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--shape", "tiny", "--image-size", "64", "--steps", "1",
         "--warmup", "0", "--batch-images", "2", "--caption-images", "4", "--caption-batch", "4", "--new-tokens", "3",
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    for part in ["loading", "train", "caption"]:
        for path in ["original", "ours"]:
            assert all(v > 0 for k, v in report[part][path].items() if k.endswith("_per_s") or k.endswith("per_core")), part
    assert "training, captions/s" in result.stdout and "JPEG loading" in result.stdout


def test_benchmark_other_families(tmp_path):
    """GIT and BLIP-2 (tiny shapes): our path only, through the family interface, with positive rates."""
    for family in ["git", "blip2"]:
        out = tmp_path / f"bench-{family}.json"
        result = subprocess.run(
            [sys.executable, "scripts/benchmark.py", "--family", family, "--shape", "tiny", "--image-size", "32",
             "--steps", "1", "--warmup", "0", "--batch-images", "2", "--caption-images", "2", "--caption-batch", "2",
             "--new-tokens", "2", "--num-beams", "1", "--skip", "loading", "--json", str(out)],
            cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads(out.read_text())
        assert report["settings"]["family"] == family and "original" not in report["train"]
        assert report["train"]["ours"]["captions_per_s"] > 0 and report["caption"]["ours"]["images_per_s"] > 0
        assert report["train"]["ours"]["peak_memory_gb"] > 0
        assert report["settings"]["lora"] == (family == "blip2")  # BLIP-2 trains LoRA only
        assert "only our path is timed" in result.stdout


def test_benchmark_compares_the_text_decoders_attention_alone(tmp_path):
    """--compare-attention with every other part skipped: the text decoder timed with transformers' attention and
    with ours, on the same weights and inputs (their logits agree)."""
    out = tmp_path / "bench-attention.json"
    result = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--shape", "tiny", "--image-size", "32", "--steps", "1",
         "--warmup", "0", "--batch-images", "1", "--captions-per-image", "2", "--skip", "loading,train,caption",
         "--compare-attention", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    attention = json.loads(out.read_text())["attention"]
    assert attention["plain_step_s"] > 0 and attention["fused_step_s"] > 0 and attention["speedup"] > 0
    assert attention["image_tokens"] == 5 and attention["captions"] == 2
    assert attention["largest_logit_difference"] < 1e-4
    assert "transformers' attention" in result.stdout and "fused" in result.stdout

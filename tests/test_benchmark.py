"""The benchmark script runs end to end (tiny shapes) and reports every comparison it promises."""
import json
import subprocess
import sys

from conftest import REPO, SAMPLE


def test_benchmark_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--shape", "tiny", "--image-size", "64", "--steps", "1",
         "--warmup", "0", "--batch-images", "2", "--caption-images", "4", "--caption-batch", "4", "--new-tokens", "3",
         "--sample-dir", str(SAMPLE / "val"), "--json", str(out)],
        cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    for part in ["loading", "train", "caption"]:
        for path in ["original", "ours"]:
            assert all(v > 0 for k, v in report[part][path].items() if k.endswith("_per_s") or k.endswith("per_core")), part
    assert "training, captions/s" in result.stdout and "JPEG loading" in result.stdout

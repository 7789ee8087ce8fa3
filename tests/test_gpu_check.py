"""scripts/gpu_check.sh: the one GPU script. Without a GPU it stops at once, in one line, before writing results;
its summary reads the benchmark's JSON as benchmark.py writes it."""
import json
import subprocess
import sys

import torch

from conftest import REPO

SCRIPT = (REPO / "scripts" / "gpu_check.sh").read_text()


def test_without_a_gpu_it_says_so_in_one_line_and_exits_2(tmp_path):
    assert not torch.cuda.is_available()
    result = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path / "out")], cwd=REPO, capture_output=True,
                            text=True, env={"PATH": f"{sys.prefix}/bin:/usr/bin:/bin"})
    assert result.returncode == 2
    assert result.stdout.strip() == "gpu_check.sh needs a CUDA GPU (torch.cuda.is_available() is False)"
    assert not list((tmp_path / "out").glob("*.json"))


def test_its_table_reads_the_benchmark_json(tmp_path):
    summary = SCRIPT.split("<<'PY' | tee \"$OUT/gpu_check.txt\"\n")[1].split("\nPY\n")[0]
    run = {"train": {"ours": {"captions_per_s": 900.0, "mfu": 0.41, "peak_memory_gb": 20.0},
                     "ours_bf16_weights": {"captions_per_s": 1125.0, "mfu": 0.52, "peak_memory_gb": 15.0},
                     "original": {"captions_per_s": 100.0}},
           "caption": {"ours": {"images_per_s": 155.0}},
           "attention": {"plain_step_s": 0.056, "fused_step_s": 0.04, "speedup": 1.4}}
    for name in ("base.json", "large_lora.json"):
        (tmp_path / name).write_text(json.dumps(run))
    (tmp_path / "gpu.txt").write_text("NVIDIA H200, 143771 MiB\n")
    runs = [{"seed": seed, "precision": p, "best_CIDEr": 2.5 + seed / 10 + i / 100, "final_CIDEr": 2.0}
            for seed in range(2) for i, p in enumerate(["fp32", "bf16", "bf16-weights"])]
    (tmp_path / "precision.txt").write_text("".join(json.dumps(r) + "\n" for r in runs))
    out = subprocess.run([sys.executable, "-c", summary, str(tmp_path)], capture_output=True, text=True, check=True)
    assert "NVIDIA H200" in out.stdout and "41.0%" in out.stdout and "9.0x" in out.stdout
    assert "0.83 min" in out.stdout  # 7,750 images at 155 images/s
    assert "1.25x bf16" in out.stdout and "52.0%" in out.stdout  # bf16-weights against bf16 autocast
    assert "1.40x" in out.stdout and "56 ms/step" in out.stdout  # the fused text attention
    assert "2.520 / 2.620" in out.stdout  # bf16-weights' best CIDEr-D for seeds 0 and 1

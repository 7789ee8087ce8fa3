"""Jobs cannot run on the wrong device, or without their checkpoints and data, by accident: the GPU guard of train,
resume and test (and of multi_gpu_train.sh), what scripts/job_env.sh tells a job (its GPU request, HF_HOME, offline
mode), the one-line errors that name scripts/get_data.py, and which torch scripts/setup_env.sh installs."""
import json
import platform
import subprocess
import sys

import pytest
import torch

from conftest import FAST, REPO, run_module
from src.base import constants

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="simulates a node whose torch sees no GPU")


def _one_error_line(result):
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr.strip()


# ---------------------------------------------------------------- the GPU guard

@no_gpu
def test_a_run_given_gpus_by_cuda_visible_devices_stops_in_one_line_when_torch_sees_none(tmp_path):
    out = tmp_path / "run"
    result = run_module("src.ft.train", "--output-dir", out, check=False, subprocess=True,
                        env={"CUDA_VISIBLE_DEVICES": "0"})
    line = _one_error_line(result)
    assert line.startswith("error: CUDA_VISIBLE_DEVICES=0 asks for a GPU, but torch ")
    for check in ('python -c "import torch; print(torch.version.cuda)"', "scripts/setup_env.sh", "--allow-cpu"):
        assert check in line, line
    assert not out.exists()  # stopped before anything else


@no_gpu
@pytest.mark.parametrize("module", ["src.ft.train", "src.peft.resume", "src.ft.test"])
def test_an_sge_job_that_asked_for_a_gpu_stops_in_one_line_before_loading_anything(module, tmp_path):
    out = tmp_path / "run"
    if module.endswith("resume"):  # a run to resume (its state is not read before the check)
        (out / "state").mkdir(parents=True)
        (out / "config.json").write_text(json.dumps({"method": "peft"}))
        (out / "state" / "progress.json").write_text("{}")
    result = run_module(module, "--output-dir", out, "--data-dir", tmp_path / "no-data", check=False,
                        env={"JOB_ID": "4242", "JOB_GPU_REQUEST": "gpu=1"})
    line = _one_error_line(result)
    assert line.startswith("error: SGE job 4242 asked for a GPU (gpu=1), but torch "), line
    if module.endswith("resume"):
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "state"]  # no log, no lock: nothing written
    else:
        assert not out.exists()


@no_gpu
def test_allow_cpu_runs_a_job_that_asked_for_a_gpu_on_the_cpu(tmp_path, monkeypatch, tiny_blip, demo_data):
    job = {"JOB_ID": "4242", "JOB_GPU_REQUEST": "gpu=1"}
    data = ["--data-dir", demo_data, "--checkpoint", tiny_blip, *FAST]
    run_module("src.ft.train", *data, "--output-dir", tmp_path / "train", "--max-steps", "2", "--no-eval-at-start",
               "--val-max-images", "4", "--allow-cpu", env=job)
    monkeypatch.setattr(constants, "ALLOW_CPU", True)  # ALLOW_CPU=1
    run_module("src.ft.test", *data, "--output-dir", tmp_path / "test", env=job)
    assert len(json.loads((tmp_path / "test" / "test_captions.json").read_text())) == 25


def _multi_gpu(tmp_path, env):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "VENV_DIR": sys.prefix, "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run(["bash", "multi_gpu_train.sh", "ft", "--output-dir", str(tmp_path / "run")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


@no_gpu
def test_the_multi_gpu_wrapper_stops_in_one_line_before_starting_its_processes(tmp_path):
    result = _multi_gpu(tmp_path, {"CUDA_VISIBLE_DEVICES": "0,1"})
    assert _one_error_line(result).startswith("error: CUDA_VISIBLE_DEVICES=0,1 asks for a GPU, but torch ")
    assert "starting" not in result.stdout and not (tmp_path / "run").exists()


# ---------------------------------------------------------------- scripts/job_env.sh

QSTAT = """job_number:                 4242
hard resource_list:         {hard}
soft resource_list:         h_rt=7200"""


def _job_env(tmp_path, hard=None, args=(), env=None):
    """Source job_env.sh as the wrappers do, with the job's flags `args`, under SGE (JOB_ID 4242) with a stand-in
    qstat showing the resource list `hard` when given; returns the variables it left for the job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if hard is not None:
        (bin_dir / "qstat").write_text(f"#!/bin/bash\n[ \"$1 $2\" = \"-j 4242\" ] && cat <<'END'\n"
                                       f"{QSTAT.format(hard=hard)}\nEND\n")
        (bin_dir / "qstat").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "VENV_DIR": sys.prefix,
           **({"JOB_ID": "4242"} if hard is not None else {}), **(env or {})}
    show = ('set -uo pipefail; source scripts/job_env.sh || exit; '
            'printf "%s\\n" "${JOB_GPU_REQUEST-unset}" "${HF_HOME-unset}" "${HF_HUB_OFFLINE-unset}" '
            '"$(job_time_limit 24:00:00)"')
    result = subprocess.run(["bash", "-c", show, "job", *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    lines = result.stdout.split("\n")
    return dict(zip(["JOB_GPU_REQUEST", "HF_HOME", "HF_HUB_OFFLINE", "time_limit"], lines[1:5]))


def test_an_sge_jobs_gpu_request_reaches_the_run(tmp_path):
    requests = {hard: _job_env(tmp_path, hard)["JOB_GPU_REQUEST"]
                for hard in ("gpu=1,h_rt=3600", "h_rt=3600,ngpus=2", "h_rt=3600", "gpu=0,h_rt=3600", None)}
    assert requests == {"gpu=1,h_rt=3600": "gpu=1", "h_rt=3600,ngpus=2": "ngpus=2",
                        "h_rt=3600": "unset", "gpu=0,h_rt=3600": "unset", None: "unset"}  # None: not under SGE
    assert _job_env(tmp_path, "gpu=1,h_rt=3600")["time_limit"] == "3600"  # from the same qstat answer


def _cache(hf_home, name, weights="model.safetensors"):
    """A Hugging Face cache entry for hub checkpoint `name`, as get_data.py --checkpoints leaves it."""
    repo = hf_home / "hub" / f"models--{name.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    for file in ("config.json", weights):
        (snapshot / file).write_text("{}")


def test_jobs_use_the_hf_home_of_the_constants_and_go_offline_when_it_holds_their_checkpoints(tmp_path):
    default = _job_env(tmp_path, "gpu=1")
    assert default["HF_HOME"] == str(tmp_path / ".cache" / "huggingface")  # huggingface_hub's own default
    assert default["HF_HUB_OFFLINE"] == "unset"  # nothing fetched: the hub may still be reachable

    hf_home = tmp_path / "hf"
    settings = {"HF_HOME": str(hf_home)}  # as HF_HOME in src/base/constants.py
    base, large = constants.FT_CHECKPOINT, constants.PEFT_CHECKPOINT
    _cache(hf_home, base)
    assert _job_env(tmp_path, "gpu=1", env=settings) == {**default, "HF_HOME": str(hf_home)}
    assert _job_env(tmp_path, "gpu=1", ["--checkpoint", base], settings)["HF_HUB_OFFLINE"] == "1"
    _cache(hf_home, large, weights="pytorch_model.bin")
    assert _job_env(tmp_path, "gpu=1", ["--epochs", "1"], settings)["HF_HUB_OFFLINE"] == "1"
    assert _job_env(tmp_path, "gpu=1", ["--checkpoint", "someone/else"], settings)["HF_HUB_OFFLINE"] == "unset"
    assert _job_env(tmp_path, None, [], {**settings, "HF_HUB_OFFLINE": "0"})["HF_HUB_OFFLINE"] == "0"  # yours wins


# ---------------------------------------------------------------- missing checkpoints and data

@pytest.mark.parametrize("module", ["src.ft.train", "src.peft.test"])
def test_a_checkpoint_missing_from_the_cache_names_the_command_that_fetches_it(module, tmp_path, demo_data):
    result = run_module(module, "--checkpoint", "someone/not-fetched", "--data-dir", demo_data,
                        "--output-dir", tmp_path / "run", *FAST, check=False)
    line = _one_error_line(result)
    assert line.startswith("error: --checkpoint someone/not-fetched: not in the Hugging Face cache")
    assert line.endswith("python scripts/get_data.py --checkpoints someone/not-fetched")


def test_all_defaults_without_the_data_set_name_the_command_that_fetches_it(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "DATA_DIR", str(tmp_path / "vizwiz"))  # as when data/vizwiz was never fetched
    monkeypatch.setattr(constants, "RESULTS_DIR", str(tmp_path / "results"))
    line = _one_error_line(run_module("src.ft.train", check=False))
    assert f"{tmp_path / 'vizwiz'}: data directory does not exist" in line
    assert "python scripts/get_data.py" in line


# ---------------------------------------------------------------- scripts/setup_env.sh: which torch

FAKE_PYTHON = r"""#!/bin/bash
# python as setup_env.sh uses it: makes a "virtual environment", records pip's commands, and has the torch build
# FAKE_TORCH (a CUDA version, "none" for a CPU-only build; unset: no torch)
echo "python $*" >> "$PIP_LOG"
if [ "$1 $2" = "-m venv" ]; then
    mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && echo "PATH=\"$3/bin:\$PATH\"" > "$3/bin/activate"
elif [ "$1" = -c ]; then
    [ -n "${FAKE_TORCH:-}" ] || exit 1
    case "$2" in *print*) [ "$FAKE_TORCH" = none ] && echo "2.13.0+cpu" || echo "" ;; esac
fi
exit 0
"""


def _setup_env(tmp_path, env, gpu=False, torch_build=None):
    """Source setup_env.sh into a new environment with python (and, with `gpu`, nvidia-smi) replaced by stand-ins;
    returns (the torch requirement it installed, or None, and its stderr)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python3").write_text(FAKE_PYTHON)
    if gpu:
        (bin_dir / "nvidia-smi").write_text("#!/bin/bash\necho 'GPU 0: NVIDIA H100 80GB HBM3'\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    log = tmp_path / "pip.log"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "VENV_DIR": str(tmp_path / "venv"),
           "PIP_LOG": str(log), **({"FAKE_TORCH": torch_build} if torch_build else {}), **env}
    # sourced as run_tests.sh and demo.sh source it: any failing command would end them
    result = subprocess.run(["bash", "-c", "set -euo pipefail; source scripts/setup_env.sh"], cwd=REPO, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    installs = [line.split(" install -q ")[1] for line in log.read_text().splitlines() if " install -q " in line]
    assert installs[0] == "--upgrade pip" and installs[-1].endswith(f"-r {REPO / 'requirements.txt'}")
    return (installs[1] if len(installs) == 3 else None), result.stderr


REQUIRED_TORCH = next(line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()
                      if line.startswith("torch"))
CPU_TORCH = "torch==2.13.0"


def test_setup_installs_the_torch_a_gpu_node_needs_unless_told_cpu(tmp_path):
    assert REQUIRED_TORCH.startswith("torch>")  # PyPI's default build: CUDA on Linux x86_64
    cases = {  # name: (environment, whether nvidia-smi finds a GPU, the torch installed)
        "login node": ({}, False, REQUIRED_TORCH),  # no GPU here, but the jobs run on GPU nodes
        "GPU node": ({}, True, REQUIRED_TORCH),
        "TORCH_SPEC=cpu": ({"TORCH_SPEC": "cpu"}, True, CPU_TORCH),
        "CI": ({"CI": "true"}, False, CPU_TORCH),
        "auto, no GPU": ({"TORCH_SPEC": "auto"}, False, CPU_TORCH),  # demo.sh and run_tests.sh here
        "auto, GPU": ({"TORCH_SPEC": "auto"}, True, REQUIRED_TORCH),
        "a requirement": ({"TORCH_SPEC": "torch==2.5.1", "PIP_EXTRA": "--index-url https://example.org/cu118"}, False,
                          "--index-url https://example.org/cu118 torch==2.5.1"),
    }
    installed = {name: _setup_env(tmp_path / str(i), env, gpu) for i, (name, (env, gpu, _)) in enumerate(cases.items())}
    assert installed == {name: (torch, "") for name, (_, _, torch) in cases.items()}


@pytest.mark.skipif(f"{platform.system()}-{platform.machine()}" != "Linux-x86_64",
                    reason="where PyPI's default torch is the CUDA build")
def test_setup_says_so_when_the_environment_keeps_a_cpu_only_torch_for_gpu_jobs(tmp_path):
    cases = {"CPU-only torch, GPU setup": ({}, "none"), "CPU-only torch, TORCH_SPEC=cpu": ({"TORCH_SPEC": "cpu"}, "none"),
             "CUDA torch, GPU setup": ({}, "12.8")}
    said = {name: _setup_env(tmp_path / str(i), env, torch_build=build)
            for i, (name, (env, build)) in enumerate(cases.items())}
    warning = said.pop("CPU-only torch, GPU setup")
    assert warning[0] is None  # torch is there: kept
    assert warning[1].startswith("warning: ") and warning[1].count("\n") == 1, warning
    assert "has torch 2.13.0+cpu, a CPU-only build" in warning[1] and "scripts/setup_env.sh" in warning[1]
    assert said == {name: (None, "") for name in said}

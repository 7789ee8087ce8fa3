"""conftest.run_module runs entry points in this process: it must report what a new interpreter would, and put
back the global state the run changed."""
import logging
import os
import signal
import sys

import pytest
import torch

from conftest import FAST, run_module


@pytest.mark.parametrize("argv", [[], ["--annotations", "missing.json", "--predictions", "missing.json"]])
def test_in_process_reports_what_a_subprocess_does(argv):
    """argparse's and the UserError's messages, on stderr, exit status 2; nothing on stdout."""
    here, there = run_module("src.base.evaluate", *argv, check=False), \
        run_module("src.base.evaluate", *argv, check=False, subprocess=True)
    assert (here.returncode, here.stdout, here.stderr) == (there.returncode, there.stdout, there.stderr)
    assert here.returncode == 2 and here.stderr.startswith("error: ")


def test_in_process_restores_global_state(tmp_path, tiny_blip, demo_data):
    """A short training run (it sets up logging to the console and a file, installs signal handlers, seeds)."""
    log = logging.getLogger("vizwiz")
    before = (os.getcwd(), dict(os.environ), sys.argv[:], list(log.handlers), log.propagate,
              [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)],
              torch.get_num_threads(), torch.get_rng_state())
    result = run_module("src.ft.train", "--data-dir", demo_data, "--checkpoint", tiny_blip, "--output-dir", tmp_path,
                        *FAST, "--max-steps", "2", "--no-eval-at-start", "--val-max-images", "4",
                        env={"VIZWIZ_RUN_MODULE_TEST": "1"})
    assert "done: best validation CIDEr" in result.stdout  # the log's console handler wrote to the captured stdout
    assert "done: best validation CIDEr" not in result.stderr  # the log goes to stdout only
    after = (os.getcwd(), dict(os.environ), sys.argv[:], list(log.handlers), log.propagate,
             [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)],
             torch.get_num_threads(), torch.get_rng_state())
    assert after[:-1] == before[:-1] and torch.equal(after[-1], before[-1])


def test_environment_read_at_import_needs_a_subprocess():
    with pytest.raises(ValueError, match="subprocess=True"):
        run_module("src.ft.train", env={"OMP_NUM_THREADS": "1"})

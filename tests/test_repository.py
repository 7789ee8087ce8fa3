"""The repository carries what its tests read: a test that reads beside the clone fails, and the files the tests
read (tests/fixtures) are not kept out of a commit by .gitignore."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import FIXTURES, HUB_BASE, READS_BESIDE, REPO, SAMPLE, beside_the_clone

CLONE_FOLDER = REPO.parent


def test_a_read_beside_the_clone_is_caught():
    if os.path.realpath(CLONE_FOLDER) == os.sep:
        pytest.skip("the clone lies directly in /: everything is beside it")
    missing = CLONE_FOLDER / "a-sibling-folder" / "no-such-file.json"
    earlier = len(READS_BESIDE)
    with pytest.raises(FileNotFoundError):
        open(missing)
    caught = READS_BESIDE[earlier:]
    del READS_BESIDE[earlier:]  # this test's own read must not fail it (conftest.reads_nothing_beside_the_clone)
    assert caught == [str(missing)]
    assert beside_the_clone(CLONE_FOLDER / "a-sibling-folder" / "hub_files" / "vocab.txt")


def test_the_repository_its_environment_and_temporary_files_are_not_beside_it(tmp_path):
    for path in [SAMPLE / "val", HUB_BASE / "vocab.txt", REPO, tmp_path / "x.json", sys.prefix, sys.executable]:
        assert not beside_the_clone(path), path


def test_the_fixtures_are_not_git_ignored():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    files = [str(path.relative_to(REPO)) for path in FIXTURES.rglob("*") if path.is_file()]
    assert len(files) > 15
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *files], cwd=REPO, capture_output=True, text=True)
    assert ignored.returncode == 1 and not ignored.stdout, f".gitignore keeps these out of a clone:\n{ignored.stdout}"


def test_no_committed_link_leads_out_of_the_repository_and_no_environment_is_committed():
    """A clone must be whole by itself: a committed symbolic link to something outside it (once, a worktree's link
    to this machine's .venv) would be dangling in every other clone, and setup_env.sh would fail to make .venv."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "-s"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    links = [line.split("\t", 1)[1] for line in tracked.splitlines() if line.startswith("120000 ")]
    outside = [link for link in links if not os.path.realpath(REPO / link).startswith(str(REPO.resolve()) + os.sep)]
    assert not outside, f"committed links that lead out of the repository: {outside}"
    names = [line.split("\t", 1)[1] for line in tracked.splitlines()]
    assert not [n for n in names if n.split("/")[0] in (".venv", "venv")], "a virtual environment is committed"
    ignored = subprocess.run(["git", "check-ignore", "--no-index", ".venv"], cwd=REPO, capture_output=True, text=True)
    assert ignored.stdout.strip() == ".venv"  # ignored as a link too, not only as a folder ('.venv/')

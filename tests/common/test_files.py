"""Safe writes: atomic replacement, output folders checked before the work, the run lock, fault points."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys

import pytest

from common import files
from common.errors import UserError
from tests.helpers import REPO


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    files.write_atomic(path, "old")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(files.WriteError, match=r"cannot write .*summary.json: No space left on device"):
        files.write_atomic(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left behind


def test_other_os_errors_are_not_hidden(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EBADF, "Bad file descriptor")))
    with pytest.raises(OSError) as info:
        files.write_atomic(tmp_path / "x", "data")
    assert not isinstance(info.value, UserError)


@pytest.mark.parametrize("make, expected", [
    (lambda d: (d / "a_file").write_text("x") and d / "a_file", "is a file, not a folder"),
    (lambda d: (d / "a_file").write_text("x") and d / "a_file" / "sub" / "run", "cannot be created: .*a_file is a file"),
])
def test_output_dir_that_cannot_be_a_folder(tmp_path, make, expected):
    with pytest.raises(UserError, match=expected):
        files.check_output_dir(make(tmp_path))
    assert not (tmp_path / "a_file" / "sub").exists()


def test_output_dir_that_cannot_be_written(tmp_path, monkeypatch):
    def read_only(**kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(files.tempfile, "mkstemp", lambda **kwargs: read_only())
    with pytest.raises(UserError, match=r"--output .*new/run cannot be written \(.* is not writable\): Read-only"):
        files.check_output_dir(tmp_path / "new" / "run")
    monkeypatch.undo()
    files.check_output_dir(tmp_path / "new" / "run")  # creatable: fine, and nothing is created
    assert list(tmp_path.iterdir()) == []


def test_run_lock_admits_one_training_and_writes_nothing_until_claimed(tmp_path):
    first = files.RunLock(tmp_path).acquire()
    with pytest.raises(UserError, match=r"in use by another training \(pid \?\)"):
        files.RunLock(tmp_path).acquire()
    assert list(tmp_path.iterdir()) == []
    first.claim()
    with pytest.raises(UserError, match=rf"in use by another training \(pid {os.getpid()}\)"):
        files.RunLock(tmp_path).acquire()
    first.release()
    files.RunLock(tmp_path).acquire().release()


def test_orphans_of_killed_writes_are_removed_and_nothing_else(tmp_path):
    (tmp_path / "epochs").mkdir()
    orphans = [tmp_path / ".last.ckpt.123.tmp", tmp_path / "epochs" / ".epoch_0002.ckpt.45.tmp"]
    keep = [tmp_path / "last.ckpt", tmp_path / "notes.tmp", tmp_path / ".hidden.tmp"]
    for path in orphans + keep:
        path.write_text("x")
    assert sorted(files.remove_orphans(tmp_path)) == sorted(orphans)
    assert all(p.exists() for p in keep)


def test_fault_point_signals_at_the_nth_hit_only():
    code = ("from common.files import fault_point\n"
            "for i in range(5):\n    fault_point('a'); fault_point('b'); print(i, flush=True)\n")
    env = {**os.environ, files.FAULT_ENV: "b@3:SIGTERM"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == -signal.SIGTERM and result.stdout.split() == ["0", "1"]
    env[files.FAULT_ENV] = "c@1"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, cwd=REPO).returncode == 0

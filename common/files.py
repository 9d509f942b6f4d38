"""Writing files safely: atomic replacement, output folders checked before the work, one writer per run folder.

Everything here needs only the standard library, so `main.py` can check an output folder before it
imports torch.

- `atomic_file` / `write_atomic`: a temporary file in the same folder, fsync, then a rename; a crash at
  any moment leaves the old file or the new one, never a torn or empty one. A write that fails for
  lack of space or permission is a `UserError` naming the file, and removes its temporary file.
- `check_output_dir`: an output folder that is a file, or cannot be created or written, is a one-line
  error before any work is done.
- `RunLock`: the lock a training holds on its run folder, so a second training into it stops at once.
- `remove_orphans`: temporary files left behind by a killed write.
- `fault_point`: named moments of the save sequence where the crash tests stop the process
  (`VISION_ATTENTION_FAULT`); a no-op otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import tempfile
from pathlib import Path

from common.errors import UserError

# Failures of a write that are the machine's state, not a bug: full disk, quota, size limit, read-only, denied.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}
_TMP = re.compile(r"^\..+\.\d+\.tmp$")  # .<name>.<pid>.tmp, what atomic_file writes


class WriteError(UserError):
    """A file could not be written (disk full, read-only, permission); the message names it."""


def write_error(path: Path | str, exc: OSError, hint: str = "") -> WriteError:
    reason = exc.strerror or type(exc).__name__
    return WriteError(f"cannot write {path}: {reason}" + (f"; {hint}" if hint else ""))


@contextlib.contextmanager
def atomic_file(path: Path | str, hint: str = ""):
    """Yield a binary file that replaces `path` only once it is completely written and on disk."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        fault_point(f"before-rename/{path.name}")
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno in WRITE_ERRNOS:
            raise write_error(path, exc, hint) from None
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    _fsync_dir(path.parent)
    fault_point(f"after-rename/{path.name}")


def write_atomic(path: Path | str, data: str | bytes, hint: str = "") -> None:
    with atomic_file(path, hint) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_orphans(folder: Path | str) -> list[Path]:
    """Delete the temporary files of writes that were killed (only while holding the folder's RunLock)."""
    folder, removed = Path(folder), []
    for candidate in [*folder.glob(".*.tmp"), *folder.glob("*/.*.tmp")]:
        if _TMP.match(candidate.name):
            with contextlib.suppress(OSError):
                candidate.unlink()
                removed.append(candidate)
    return removed


def check_output_dir(path: Path | str, option: str | None = "--output") -> None:
    """A one-line error unless `path` is, or can be created as, a folder this process can write in.

    option: where the path came from (--output, output_root), or None for a default folder.
    """
    path = Path(path)
    fix = "pick another one with --output" if option is None else \
        f"pick another {option}" if option.startswith("--") else f"change {option}"
    option = option or "output folder"
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is a file, not a folder; {fix}")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option} {path} cannot be created: {existing} is a file; {fix}")
    try:  # os.access is not enough: root passes it on read-only file systems
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        where = "" if existing == path else f" ({existing} is not writable)"
        raise UserError(f"{option} {path} cannot be written{where}: {exc.strerror}; {fix}") from None


class RunLock:
    """An exclusive lock on a run folder for the life of the process (released by the OS even on SIGKILL).

    The lock is on the folder itself, so taking it writes nothing; `claim` records the holder's pid in
    `.lock` once the training begins to write, for the error a second training gets.
    """

    NAME = ".lock"

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        self.fd = None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): one writer per folder is then the user's to ensure
            return self
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                holder = (self.folder / self.NAME).read_text().strip()
            except OSError:
                holder = "?"
            raise UserError(f"{self.folder} is in use by another training (pid {holder}); wait for it to end or "
                            f"train into another --output") from None
        except OSError:  # a file system without flock (some network mounts): no lock there
            os.close(fd)
            return self
        self.fd = fd
        return self

    def claim(self) -> None:
        write_atomic(self.folder / self.NAME, f"{os.getpid()}\n")

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# ---------------------------------------------------------------------------- fault injection

FAULT_ENV = "VISION_ATTENTION_FAULT"
_fault_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Signal this process at the n-th time it reaches `name`, if VISION_ATTENTION_FAULT asks for it.

    VISION_ATTENTION_FAULT is a comma-separated list of POINT[@N][:SIGNAL] (N defaults to 1, SIGNAL to
    SIGKILL), e.g. `before-rename/best.ckpt@2` or `train-step@3:SIGINT`. The points are the renames of
    every atomic write (`before-rename/<file>`, `after-rename/<file>`), `epoch-logged` (the epoch's
    metrics line is written, its checkpoint not yet), `train-step` and `final-test`.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    hits = _fault_hits[name] = _fault_hits.get(name, 0) + 1
    for item in spec.split(","):
        point, _, sig = item.strip().partition(":")
        point, _, nth = point.partition("@")
        if point == name and hits == int(nth or 1):
            os.kill(os.getpid(), getattr(signal, sig or "SIGKILL"))

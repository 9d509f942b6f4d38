"""Compile one C++ source into a shared library on first use, cached per machine, safe under concurrency.

    path = build("neighborhood_cpu", source, flags)   # BuildError if it cannot

One compiler call, no build system: a single file needs no ninja (torch.utils.cpp_extension.load does,
and its `ninja` must be on PATH, which a pip-installed ninja is not when python is run without activating
its environment). The flags come from the caller; `torch_flags()` gives those that link against the
running torch (its headers, libraries, C++ ABI), which is what torch.utils.cpp_extension would use.

Cache: `$TORCH_EXTENSIONS_DIR/<name>/` (default ~/.cache/torch_extensions, torch's own convention), one
file `<name>-<key>.so` per key, the key hashing the source, the compiler and its version, the flags, the
torch build and this CPU's model and feature flags (so a home directory shared by machines of different
generations never hands one a library built for another's instruction set).

Concurrency (several processes, pytest workers, torchrun ranks): builders take an exclusive flock on
`<name>-<key>.lock`, check again whether the library appeared meanwhile, compile into a private temporary
file and rename it into place atomically, so a reader sees either no library or a whole one. The kernel
drops a flock when its holder dies, so a killed build never leaves a stale lock behind.

A compile error is remembered (`<name>-<key>.failed`, next to the log `<name>-<key>.log`) so that later
processes do not pay for the same failed compile again; delete the file to retry. A compiler stopped by a
signal says nothing about the source and is not remembered. The compiler runs in a session of its own, so that
a Ctrl-C at the terminal (which signals the whole foreground process group) reaches only the Python process:
a training that stops gracefully after its step lets the build finish, and one that raises KeyboardInterrupt
kills the compiler on the way out (subprocess.run does). Otherwise a Ctrl-C during a training's first-use
compile would kill the compiler and mark the kernel as failed on that machine until the marker is deleted.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; the atomic rename alone keeps concurrent builds correct
    fcntl = None

COMPILE_TIMEOUT_S = 600
LOCK_TIMEOUT_S = 900


class BuildError(RuntimeError):
    """The library cannot be built here; the message says why and what to do."""


def cache_root() -> Path:
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")


def find_compiler() -> str:
    """$CXX, else the first of c++, g++, clang++ on PATH; BuildError if none."""
    wanted = os.environ.get("CXX")
    for candidate in ([wanted] if wanted else ["c++", "g++", "clang++"]):
        path = shutil.which(candidate)
        if path:
            return path
    raise BuildError(f"no C++ compiler found ({'CXX=' + wanted + ' is not an executable' if wanted else 'tried c++, g++, clang++'}); "
                     "install one (e.g. apt-get install g++) or set CXX")


def cpu_fingerprint() -> str:
    """The CPU model and feature flags (what -march=native compiles for)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def torch_flags() -> tuple[list[str], list[str]]:
    """(compile flags, link flags) for a library that uses ATen and registers torch ops (no Python API)."""
    import torch

    root = Path(torch.__file__).resolve().parent
    lib = root / "lib"
    compile_flags = [f"-isystem{root / 'include'}", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    link_flags = [f"-L{lib}", "-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{lib}"]
    return compile_flags, link_flags


def _compiler_version(compiler: str) -> str:
    try:
        result = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(f"the C++ compiler {compiler} does not run ({exc})") from exc
    return result.stdout.strip()


def library_key(source: Path, compiler: str, flags: list[str]) -> str:
    import torch

    digest = hashlib.sha256()
    for part in (source.read_bytes(), compiler.encode(), _compiler_version(compiler).encode(), "\0".join(flags).encode(),
                 torch.__version__.encode(), str(torch.version.git_version).encode(), cpu_fingerprint().encode(),
                 sysconfig.get_platform().encode()):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _exclusive(lock_path: Path, timeout_s: float):
    if fcntl is None:
        yield
        return
    with open(lock_path, "a") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BuildError(f"gave up after {timeout_s:.0f} s waiting for another process to finish "
                                     f"building (lock {lock_path})") from None
                time.sleep(0.2)
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
                yield  # a filesystem without locks: concurrent builders may compile twice, still atomically
                return
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build(name: str, source: Path, flags: list[str], announce: bool = True) -> Path:
    """The path of the compiled library, compiling `source` with `flags` if this key has none yet."""
    compiler = find_compiler()
    key = library_key(source, compiler, flags)
    directory = cache_root() / name
    target = directory / f"{name}-{key}.so"
    if target.exists():
        return target
    failed, log = directory / f"{name}-{key}.failed", directory / f"{name}-{key}.log"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuildError(f"cannot create the cache directory {directory} ({exc}); set TORCH_EXTENSIONS_DIR "
                         "to a writable directory") from exc
    with _exclusive(directory / f"{name}-{key}.lock", LOCK_TIMEOUT_S):
        if target.exists():  # another process built it while we waited
            return target
        if failed.exists():
            raise BuildError(f"an earlier compile of this source failed (log: {log}); delete {failed} to retry")
        if announce:
            print(f"{name}: compiling {source.name} with {compiler} into {target} (once per machine; about a "
                  "minute)", file=sys.stderr, flush=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}-{key}-", suffix=".so", dir=directory)
        os.close(fd)
        command = [compiler, str(source), "-o", tmp, *flags]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, check=False,
                                    start_new_session=True)
        except subprocess.TimeoutExpired as exc:
            os.unlink(tmp)
            raise BuildError(f"compiling {source.name} took more than {COMPILE_TIMEOUT_S} s") from exc
        except BaseException:
            os.unlink(tmp)
            raise
        log.write_text(" ".join(command) + "\n\n" + result.stdout + result.stderr)
        if result.returncode < 0:  # killed (an OOM killer, a job scheduler's SIGTERM): try again next time
            os.unlink(tmp)
            raise BuildError(f"the compiler was stopped by signal {-result.returncode} while compiling "
                             f"{source.name}; the next use compiles it again")
        if result.returncode != 0:
            os.unlink(tmp)
            failed.write_text(f"exit code {result.returncode}\n")
            lines = (result.stdout + result.stderr).strip().splitlines() or ["(no output)"]
            first = next((line for line in lines if "error" in line.lower()), lines[-1])
            raise BuildError(f"compiling {source.name} failed: {first.strip()[:300]} (full log: {log})")
        os.replace(tmp, target)
    return target

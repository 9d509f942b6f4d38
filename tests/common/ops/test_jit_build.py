"""The first-use compiler: cached per key, one compile however many processes ask at once, a failed compile
remembered, clear errors without a compiler or a writable cache. A tiny source stands in for the kernel."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from common.ops import jit_build

ROOT = Path(__file__).resolve().parents[3]
FLAGS = ["-shared", "-fPIC", "-O1"]

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="needs a C++ compiler")


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A cache directory, a source and a compiler that logs each compile (and takes a second over it, so that
    concurrent builders overlap)."""
    source = tmp_path / "answer.cpp"
    source.write_text('extern "C" int answer() { return 42; }\n')
    log = tmp_path / "calls.log"
    real = shutil.which("c++") or shutil.which("g++")
    compiler = tmp_path / "logging-c++"
    compiler.write_text(f'#!/bin/sh\n[ "$1" = --version ] && exec "{real}" "$@"\necho call >> "{log}"\nsleep 1\n'
                        f'exec "{real}" "$@"\n')
    compiler.chmod(compiler.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    return source, log


def calls(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_builds_once_and_caches(setup):
    source, log = setup
    path = jit_build.build("answer", source, FLAGS, announce=False)
    assert ctypes.CDLL(str(path)).answer() == 42
    assert jit_build.build("answer", source, FLAGS, announce=False) == path and calls(log) == 1
    source.write_text('extern "C" int answer() { return 43; }\n')  # a new source is a new key
    other = jit_build.build("answer", source, FLAGS, announce=False)
    assert other != path and calls(log) == 2
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_concurrent_builders_compile_once(setup):
    source, log = setup
    script = textwrap.dedent(f"""
        from pathlib import Path
        from common.ops import jit_build
        print(jit_build.build("answer", Path({str(source)!r}), {FLAGS!r}, announce=False))
    """)
    processes = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=os.environ.copy(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs
    paths = {out.strip() for out, _ in outputs}
    assert len(paths) == 1 and calls(log) == 1
    assert ctypes.CDLL(paths.pop()).answer() == 42


def test_a_failed_compile_is_remembered(setup):
    source, log = setup
    source.write_text("this is not C++\n")
    with pytest.raises(jit_build.BuildError, match="failed: .*error.*full log"):
        jit_build.build("answer", source, FLAGS, announce=False)
    with pytest.raises(jit_build.BuildError, match="earlier compile .* failed .* delete .*\\.failed to retry"):
        jit_build.build("answer", source, FLAGS, announce=False)
    assert calls(log) == 1


def test_clear_errors_without_compiler_or_cache(setup, tmp_path, monkeypatch):
    source, _ = setup
    monkeypatch.setenv("CXX", str(tmp_path / "missing"))
    with pytest.raises(jit_build.BuildError, match="no C\\+\\+ compiler found.*set CXX"):
        jit_build.build("answer", source, FLAGS, announce=False)
    monkeypatch.delenv("CXX")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(blocker / "cache"))
    with pytest.raises(jit_build.BuildError, match="cannot create the cache directory.*TORCH_EXTENSIONS_DIR"):
        jit_build.build("answer", source, FLAGS, announce=False)


def test_ctrl_c_at_the_terminal_during_a_build_does_not_mark_it_failed(setup, tmp_path):
    """A training's SIGINT handler stops after the step instead of raising, so the build goes on; a terminal
    Ctrl-C signals the whole foreground process group, compiler included. The compiler, killed, once left a
    `.failed` marker that turned the kernel off on that machine until someone deleted it."""
    source, log = setup
    script = textwrap.dedent(f"""
        import signal
        from pathlib import Path
        from common.ops import jit_build
        signal.signal(signal.SIGINT, lambda signum, frame: print("stopping after this step", flush=True))
        print(jit_build.build("answer", Path({str(source)!r}), {FLAGS!r}, announce=False), flush=True)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=os.environ.copy(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while calls(log) == 0 and time.monotonic() < deadline:  # the compiler has started (and sleeps a second)
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C at a terminal does
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0 and "stopping after this step" in out, err
    assert ctypes.CDLL(out.strip().splitlines()[-1]).answer() == 42
    assert not list((tmp_path / "cache").rglob("*.failed"))


def test_a_compiler_killed_by_a_signal_is_not_remembered_as_a_failure(setup, tmp_path, monkeypatch):
    source, log = setup
    killed = tmp_path / "killed-c++"
    real = os.environ["CXX"]
    killed.write_text(f'#!/bin/sh\n[ "$1" = --version ] && exec "{real}" "$@"\nkill -TERM $$\n')
    killed.chmod(killed.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(jit_build, "library_key", lambda *args: "fixed")  # the same key for both compilers
    monkeypatch.setenv("CXX", str(killed))
    with pytest.raises(jit_build.BuildError, match="stopped by signal 15 .*next use compiles it again"):
        jit_build.build("answer", source, FLAGS, announce=False)
    monkeypatch.setenv("CXX", real)
    assert ctypes.CDLL(str(jit_build.build("answer", source, FLAGS, announce=False))).answer() == 42

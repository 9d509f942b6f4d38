"""bench/window_loads.cpp: the kernel's inner loop with three ways of reading its keys builds and runs as documented."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO


def test_it_builds_with_the_documented_command_and_prints_three_timed_rows(tmp_path: Path):
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("no g++")
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists() or "avx512f" not in cpuinfo.read_text(errors="replace"):
        pytest.skip("the microbenchmark needs AVX-512")
    binary = tmp_path / "window_loads"
    subprocess.run([compiler, "-O2", "-march=native", "-w", str(REPO / "bench" / "window_loads.cpp"), "-o",
                    str(binary)], check=True, timeout=120)
    out = subprocess.run([str(binary)], check=True, capture_output=True, text=True, timeout=120).stdout
    rows = {line[:16].strip(): line[16:].split() for line in out.splitlines()[2:5]}
    assert list(rows) == ["unaligned", "shifted", "32-byte steps"]
    for plain, with_embedding in rows.values():
        assert 0 < float(plain) < 1000 and 0 < float(with_embedding) < 1000

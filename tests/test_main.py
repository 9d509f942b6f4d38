"""main.py itself: the process settings it makes before torch loads."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO


def openmp_settings(policy: str | None) -> dict[str, str]:
    """The settings the OpenMP runtime read in `python main.py --help` (it displays them when it loads)."""
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["OMP_DISPLAY_ENV"] = "verbose"
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    done = subprocess.run([sys.executable, str(REPO / "main.py"), "--help"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    settings = dict(re.findall(r"^\s*(\w+)\s*=\s*'([^']*)'", done.stderr, flags=re.MULTILINE))
    if "OMP_WAIT_POLICY" not in settings:
        pytest.skip("this OpenMP runtime does not display its settings")
    return settings


def test_openmp_threads_sleep_while_waiting_unless_the_environment_says_otherwise():
    """Spinning threads make every CPU op several times slower on shared cores (README, Threads on the CPU)."""
    settings = openmp_settings(None)
    assert settings["OMP_WAIT_POLICY"] == "PASSIVE"
    if "GOMP_SPINCOUNT" in settings:  # libgomp displays PASSIVE for its default too; passive means no spinning
        assert settings["GOMP_SPINCOUNT"] == "0"
    assert openmp_settings("ACTIVE")["OMP_WAIT_POLICY"] == "ACTIVE"

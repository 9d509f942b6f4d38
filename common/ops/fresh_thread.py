"""Run a fused kernel's self-check on a thread of its own.

A kernel is checked against the reference on its first use, and that first use may come from anywhere: under
no_grad or inference_mode (an evaluation, `--task time`), under autocast (bf16 training), or inside a dispatch
mode such as the FLOP counter. All of these are thread-local, so a new thread starts with torch's defaults:
the check neither changes the caller's state nor sees it (under no_grad it could not take gradients; under
autocast the reference would run in bf16 and disagree), and so gives the same verdict wherever it is first run.
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

T = TypeVar("T")


def in_fresh_thread(fn: Callable[[], T], name: str = "kernel self-check") -> T:
    """fn() on a new thread, with torch's default thread-local state; its exception is re-raised here."""
    result: dict = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=run, name=name)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]

"""bench/train_probe.py: counting torch.compile's recompilations and recompile-limit hits (a recompilation storm)."""

from __future__ import annotations

import logging

import torch

from tests.helpers import load_bench


def load_probe():
    return load_bench("train_probe")


def test_recompilations_and_limit_hits_are_counted(monkeypatch):
    probe = load_probe()
    events = probe.watch_dynamo()
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)
    torch._dynamo.reset()

    @torch.compile(backend="eager")
    def double(x):
        return x * 2

    try:
        double(torch.ones(3))
        assert events.recompiles == 0
        for dtype in (torch.float64, torch.float16, torch.int32):  # each new dtype fails a guard
            double(torch.ones(3, dtype=dtype))
        assert events.recompiles >= 1 and events.limit_hits >= 1
        assert events.reasons and "dtype" in events.reasons[0]
        events.reset()
        assert (events.recompiles, events.limit_hits, events.reasons) == (0, 0, [])
    finally:
        logging.getLogger("torch._dynamo").removeHandler(events)
        torch._dynamo.reset()
        torch._logging.set_logs()

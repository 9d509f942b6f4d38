"""Tests of common/inspect/timing.py: counts against hand calculations, measurement
sanity on a tiny CPU model, CPU peak memory on known allocations, and output
files. No assertion depends on wall-clock values."""

import dataclasses
import io
import json
import math
import os
import time

import pytest
import torch
from torch import nn

from common.errors import UserError
from common.inspect.rounds import Progress, Workload, run_rounds, timed_workloads
from common.inspect.timing import (
    ModelSpec,
    TimingResult,
    _cpu_peak_bytes,
    count_macs,
    count_params,
    format_table,
    measure,
    measure_all,
    timed_rounds,
    write_results,
)

INPUT = (3, 16, 16)
FIELDS = [f.name for f in dataclasses.fields(TimingResult)]


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


def quick_measure(model: nn.Module, batch_size: int = 4, name: str = "tiny") -> TimingResult:
    return measure(model, name, input_size=INPUT, batch_size=batch_size, warmup=1, iters=2, latency_iters=3)


class Tied(nn.Module):
    """An embedding whose weight is reused by the output layer, plus a frozen layer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.frozen = nn.Linear(4, 4)  # 16 + 4
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: 40 elements, once


def test_count_params_hand_count_with_tied_and_frozen():
    assert count_params(tiny_net()) == (3 * 3 * 3 * 8 + 8) + (8 + 8) + (8 * 5 + 5)
    assert count_params(Tied()) == 40 + 16 + 4


def test_count_macs_linear():
    assert count_macs(nn.Linear(20, 30), (2, 7, 20)) == 2 * 7 * 20 * 30  # applied to 2*7 vectors


def test_count_macs_conv():
    conv = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)
    out_hw = 8 * 8  # 16x16 input, stride 2
    assert count_macs(conv, INPUT) == out_hw * 8 * 3 * 3 * 3


def test_count_macs_restores_training_flags():
    model = tiny_net()
    model[1].eval()  # a submodule deliberately in another mode stays so
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_macs(model, INPUT)
    assert model.training and not model[1].training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_measure_figures_and_model_untouched():
    model = tiny_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_before = torch.get_rng_state()
    r = quick_measure(model)

    assert r.model == "tiny" and r.batch_size == 4
    assert r.params == count_params(model)
    assert r.macs == count_macs(model, INPUT) > 0 and r.flops == 2 * r.macs
    for value in (r.train_img_s, r.infer_img_s, r.latency_ms, r.peak_mem_mb):
        assert math.isfinite(value) and value > 0
    assert math.isfinite(r.latency_ms_std) and r.latency_ms_std >= 0
    threads = torch.get_num_threads()
    assert r.device == f"cpu ({threads} thread{'' if threads == 1 else 's'})"

    state = model.state_dict()
    assert state.keys() == before.keys()
    assert all(torch.equal(before[k], state[k]) for k in before)  # incl. BN running stats
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_measure_bf16_autocast_and_channels_last_run_on_cpu():
    r = measure(
        tiny_net(), "amp", input_size=INPUT, batch_size=2, warmup=0, iters=1, latency_iters=2,
        amp_dtype=torch.bfloat16, channels_last=True, num_classes=5,
    )
    assert r.train_img_s > 0 and r.peak_mem_mb > 0


def test_measure_rejects_bad_arguments():
    with pytest.raises(UserError):
        measure(tiny_net(), "x", input_size=INPUT, amp_dtype=torch.float16)  # no fp16 on CPU
    with pytest.raises(UserError):
        measure(tiny_net(), "x", input_size=INPUT, iters=0)


def test_cpu_peak_bytes_known_allocations():
    def single():
        torch.empty(3 * 2**20, dtype=torch.uint8)

    def sequential():
        a = torch.empty(2**20, dtype=torch.uint8)
        del a
        b = torch.empty(2**19, dtype=torch.uint8)
        del b

    def concurrent():
        a = torch.empty(2**20, dtype=torch.uint8)
        b = torch.empty(2**19, dtype=torch.uint8)
        del a, b

    assert _cpu_peak_bytes(single) == 3 * 2**20
    assert _cpu_peak_bytes(sequential) == 2**20
    assert _cpu_peak_bytes(concurrent) == 2**20 + 2**19


def test_cpu_peak_bytes_ignores_frees_of_older_blocks():
    held = [torch.empty(2**22, dtype=torch.uint8)]

    def free_then_allocate():
        held.clear()  # frees a block allocated before the region: not ours
        torch.empty(2**20, dtype=torch.uint8)

    assert _cpu_peak_bytes(free_then_allocate) == 2**20


def test_cpu_peak_memory_grows_with_batch():
    small = quick_measure(tiny_net(), batch_size=2).peak_mem_mb
    large = quick_measure(tiny_net(), batch_size=16).peak_mem_mb
    assert 0 < small < large


def fake(name: str, **fields) -> TimingResult:
    return TimingResult(**{
        "model": name, "params": 1_500_000, "macs": 2_000_000_000, "flops": 4_000_000_000,
        "train_img_s": 100.0, "infer_img_s": 300.0, "latency_ms": 5.0, "latency_ms_std": 0.5,
        "peak_mem_mb": 123.4, "device": "cpu (2 threads)", "batch_size": 64, **fields})


def test_write_results(tmp_path):
    results = [fake("resnet26"), fake("sasa|resnet26")]
    json_path, md_path = write_results(results, tmp_path / "out")
    assert json_path == tmp_path / "out" / "time.json" and md_path == tmp_path / "out" / "time.md"

    records = json.loads(json_path.read_text())
    assert [list(rec) for rec in records] == [FIELDS, FIELDS]
    assert records[0] == results[0].as_dict()

    md = md_path.read_text()
    assert "resnet26" in md and r"sasa\|resnet26" in md
    assert format_table(results) in md


def test_format_table_units():
    table = format_table([fake("m")])
    lines = table.strip().splitlines()
    assert len(lines) == 3  # header, separator, one row: no rounds, no line about them
    row = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert row[:10] == ["m", "1.50", "2.000", "4.000", "100.0", "n/a", "300.0", "n/a", "5.00 ± 0.50", "123.4"]


def test_format_table_ratios_rounds_and_load():
    results = [fake("base", train_vs_first=1.0, infer_vs_first=1.0, rounds=4, load_avg=2.25),
               fake("slow", train_vs_first=3.5, infer_vs_first=2.125, rounds=4, load_avg=2.25)]
    lines = format_table(results).strip().splitlines()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:4]]
    assert [row[5] for row in rows] == ["1.00", "3.50"] and [row[7] for row in rows] == ["1.00", "2.12"]
    assert lines[-1].startswith("4 interleaved rounds") and "load average 2.2" in lines[-1]


# --------------------------------------------------------------------------
# Several models: interleaved rounds, ratios to the first, the budget, progress


def test_measure_all_interleaves_and_gives_ratios_to_the_first(monkeypatch):
    # one call per sample, however fast the machine: then `iters` timed steps take exactly `iters` rounds
    monkeypatch.setattr("common.inspect.rounds.MIN_SAMPLE_S", 0.0)
    small, wide = tiny_net(), nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1),
                                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 5))
    stream = io.StringIO()
    results = measure_all([ModelSpec("small", small, INPUT, batch_size=4), ModelSpec("wide", wide, INPUT, batch_size=4)],
                          warmup=1, iters=2, latency_iters=4, progress=Progress(stream))
    assert [r.model for r in results] == ["small", "wide"]
    assert results[0].train_vs_first == results[0].infer_vs_first == 1.0
    assert all(r.rounds == 2 for r in results)
    assert all(r.train_vs_first > 0 and r.infer_vs_first > 0 for r in results)
    assert results[1].macs > 50 * results[0].macs
    if hasattr(os, "getloadavg"):
        assert all(r.load_avg is not None and r.load_avg >= 0 for r in results)
    log = stream.getvalue()
    assert "time: 2 models" in log and "[1/2] small" in log and "[2/2] wide" in log and "round 1" in log


def test_without_a_budget_no_more_rounds_than_iters():
    # a cheap step is repeated within a sample, so fewer rounds than iters may already give iters timed steps
    (result,) = measure_all([ModelSpec("tiny", tiny_net(), INPUT, batch_size=2)], warmup=1, iters=3,
                            latency_iters=7)
    assert 1 <= result.rounds <= 3


def test_rounds_stop_at_the_budget_and_never_below_the_minimum():
    nap = Workload("nap", lambda: time.sleep(0.01))
    rounds = run_rounds([nap], min_rounds=2, deadline=time.perf_counter() + 0.15)
    assert 2 <= rounds.count <= 16 and len(nap.samples) == rounds.count  # a round lasts at least 10 ms
    late = Workload("late", lambda: None)
    assert run_rounds([late], min_rounds=3, deadline=time.perf_counter() - 1).count == 3
    assert run_rounds([late], min_rounds=4).count == 4 and len(late.samples) == 7  # no budget: the minimum


def test_samples_of_cheap_workloads_repeat_them():
    cheap, slow = Workload("cheap", lambda: None), Workload("slow", lambda: time.sleep(0.06))
    cheap.warm_up(1)
    slow.warm_up(1)
    assert cheap.calls > 1 and slow.calls == 1
    latency = Workload("latency", lambda: None, each=True, calls=5)
    latency.sample()
    assert len(latency.samples) == 1 and len(latency.samples[0]) == 5


def test_timed_rounds_for_the_benches():
    seconds = timed_rounds({"a": lambda: None, "b": lambda: time.sleep(0.002)}, repeats=3,
                           device=torch.device("cpu"), warmup=1)
    assert set(seconds) == {"a", "b"} and seconds["b"] >= 0.002 > seconds["a"]


def test_timed_workloads_keep_every_round():
    calls = []
    workloads = timed_workloads({"a": lambda: calls.append(1)}, repeats=4, device=torch.device("cpu"), warmup=2)
    rounds = workloads["a"].per_round()
    assert len(rounds) == 4 and len(calls) == 2 + 4 * workloads["a"].calls
    assert min(rounds) <= workloads["a"].median() <= max(rounds)


def test_measure_all_rejects_bad_arguments():
    with pytest.raises(UserError, match="budget"):
        measure_all([ModelSpec("x", tiny_net(), INPUT)], budget_s=0)
    with pytest.raises(UserError, match="batch_size of x"):
        measure_all([ModelSpec("x", tiny_net(), INPUT, batch_size=0)])
    with pytest.raises(UserError, match="at least one model"):
        measure_all([])

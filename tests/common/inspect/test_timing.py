"""Tests of common/inspect/timing.py: counts against hand calculations, measurement
sanity on a tiny CPU model, CPU peak memory on known allocations, and output
files. No assertion depends on wall-clock values."""

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from common.errors import UserError
from common.inspect.timing import (
    TimingResult,
    _cpu_peak_bytes,
    count_macs,
    count_params,
    format_table,
    measure,
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
    assert r.device == f"cpu ({torch.get_num_threads()} threads)"

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


def fake(name: str) -> TimingResult:
    return TimingResult(
        model=name, params=1_500_000, macs=2_000_000_000, flops=4_000_000_000,
        train_img_s=100.0, infer_img_s=300.0, latency_ms=5.0, latency_ms_std=0.5,
        peak_mem_mb=123.4, device="cpu (2 threads)", batch_size=64,
    )


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
    assert len(lines) == 3  # header, separator, one row
    row = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert row[:8] == ["m", "1.50", "2.000", "4.000", "100.0", "300.0", "5.00 ± 0.50", "123.4"]

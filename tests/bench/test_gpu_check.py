"""bench/gpu_check.py: its CPU smoke run end to end (the files it writes), its time budgets, its errors, and how
it reads the GPU outputs of the benches and the training probe (canned here, since CI has no GPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, load_bench

STATUSES = {"pass", "fail", "info", "skip", "error"}


def load_gpu_check():
    return load_bench("gpu_check")


def start(out: Path, *args: str) -> subprocess.Popen:
    """The check as a user runs it, on the CPU even where this machine has a GPU."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--quick", "--out", str(out), *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 900) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-3000:]}\n{err[-3000:]}"
    return out, err


def read(out: Path) -> tuple[dict, str]:
    record = json.loads((out / "gpu_check.json").read_text())
    table = (out / "gpu_check.md").read_text()
    assert (out / "gpu_check.log").stat().st_size > 0
    return record, table


def test_cpu_smoke_run_records_every_part_and_writes_the_files(tmp_path):
    # Two halves at once (the 2 CI cores): the benches, and everything else. The budget is generous so that a
    # loaded machine never skips an item here; the next test checks the skipping.
    procs = {"benches": start(tmp_path / "b", "--parts", "benches", "--budget-s", "900"),
             "rest": start(tmp_path / "r", "--parts", "tests,train,time", "--budget-s", "900")}
    outputs = {key: finish(proc) for key, proc in procs.items()}
    checks = []
    for key, folder in (("benches", "b"), ("rest", "r")):
        stdout, _ = outputs[key]
        assert stdout.splitlines()[0].startswith("no CUDA device here")
        record, table = read(tmp_path / folder)
        assert record["cuda"] is False and record["mode"] == "quick" and not record["interrupted"]
        assert [p["name"] for p in record["parts"]] == (["benches"] if key == "benches" else ["tests", "train", "time"])
        assert all(p["used_s"] <= p["budget_s"] + 5 for p in record["parts"])
        assert "| part | check | result | target | pass/fail |" in table and table.strip() in stdout
        for check in record["checks"]:
            assert set(check) >= {"part", "name", "value", "unit", "target", "status", "note", "command"}
            assert check["status"] in STATUSES and check["target"] and check["name"]
            assert f"| {check['part']} | {check['name']} |" in table
        assert sum(record["summary"].values()) == len(record["checks"])
        checks += record["checks"]
    errors = [c for c in checks if c["status"] in ("error", "skip")]
    assert not errors, errors
    names = " / ".join(c["name"] for c in checks)
    for expected in ("pytest -m gpu --collect-only", "fwd+bwd vs reference", "neighbourhood headline B=8: ",
                     "FlexAttention window mask agrees with", "SASA-R26 / conv-R26 training step",
                     "ViT attention vit_cifar plain", "DeviceLoader (crop+flip+normalise) throughput",
                     "quickstart eager: train loss", "quickstart eager: peak memory", "cnn3_cifar100: training",
                     "SAN pairwise block: lean fwd+bwd vs unfold",
                     "configs measured"):
        assert expected in names, expected
    by_name = {c["name"]: c for c in checks}
    assert by_name["pytest -m gpu --collect-only"]["value"] > 20  # the Triton, op, layer and augmentation tests
    assert next(c for c in checks if c["name"].startswith("FlexAttention window mask"))["status"] == "pass"
    gpu_targets = [c for c in checks if c["target"].endswith("(on a GPU)")]
    assert gpu_targets and all(c["status"] == "info" for c in gpu_targets)


def test_a_spent_budget_skips_with_a_note_and_still_writes_the_files(tmp_path):
    stdout, _ = finish(start(tmp_path, "--budget-s", "5"), timeout=120)
    record, table = read(tmp_path)
    assert [p["name"] for p in record["parts"]] == ["tests", "benches", "train", "time"]
    skipped = [c for c in record["checks"] if c["status"] == "skip"]
    assert len(skipped) >= 4 and all("budget" in c["note"] for c in skipped)
    assert "Summary:" in table and "skip" in stdout


def test_bad_arguments_are_one_line_errors_and_an_earlier_run_is_never_overwritten(tmp_path):
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "gpu_check.json").write_text("{}")
    (tmp_path / "a_file").write_text("")
    for out, args in ((tmp_path / "new", ["--parts", "tests,nope"]), (tmp_path / "new", ["--budget-s", "1"]),
                      (tmp_path / "new", ["--families", "sasa,nope"]),
                      (tmp_path / "new", ["--families", "sasa", "--parts", "time"]), (earlier, []),
                      (tmp_path / "a_file", [])):
        proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--out", str(out), *args],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "new").exists() and (earlier / "gpu_check.json").read_text() == "{}"


# ---------------------------------------------------------------------------------------------------------------
# Reading GPU outputs (the lines the benches print on CUDA only), without a GPU.

@pytest.fixture
def gpu_session(tmp_path):
    gc = load_gpu_check()
    session = gc.Session(tmp_path / "out", tmp_path, "full", 480, "python bench/gpu_check.py")
    session.cuda = True
    yield gc, session
    session.log.close()


def result(gc, out: str, command: str = "python bench/x.py"):
    return gc.Result(command, 0, out, 1.0, False)


NEIGHBORHOOD_CUDA = """
headline: B=64, heads=8, d=8, 32x32, kernel 7, fp32, device=cuda (NVIDIA H200), median of 7; auto -> triton
step        fwd+bwd ms  time / conv  GFLOP/s  % of GEMM  saved MiB saved / ref
reference        40.00        20.00      1.0       0.1%    1682.00       1.000
tiled             8.00         4.00      5.0       0.5%     146.00       0.087
triton            2.00         1.00     20.0       2.0%     120.00       0.071
conv3x3           2.00         1.00    500.0      50.0%      16.00       0.010
gemm              1.00         0.50   1000.0     100.0%
FAIL headline: tiled saves 0.300 of reference's bytes for backward (target <= 0.25)
"""


def test_neighbourhood_bench_on_cuda_judges_the_fused_op_at_batch_64(gpu_session):
    gc, s = gpu_session
    gc.parse_neighborhood(s, result(gc, NEIGHBORHOOD_CUDA), [])
    by_name = {c.name: c for c in s.checks}
    triton = by_name["neighbourhood headline B=64: triton fwd+bwd vs reference"]
    assert triton.value == 20.0 and triton.target == ">= 10" and triton.status == "pass"
    assert by_name["neighbourhood headline B=64: tiled fwd+bwd vs reference"].status == "info"
    assert by_name["neighbourhood headline B=64: triton fwd+bwd vs 3x3 conv"].value == 1.0
    verdicts = {c.value: c.status for c in s.checks if c.name == "neighbourhood headline B=64 (the bench's own target)"}
    assert verdicts == {"tiled saves 0.300 of reference's bytes for backward (target <= 0.25)": "fail"}


def test_flex_anchor_vit_sasa_and_loader_outputs_on_cuda(gpu_session, tmp_path):
    gc, s = gpu_session
    flex = {"batch": 64, "heads": 4, "head_dim": 16, "size": 32, "kernel": 7, "dtype": "bf16", "auto_backend": "triton",
            "flex_error": 0.004, "tolerance": 0.03, "ms": {"reference": 30.0, "tiled": 6.0, "triton": 1.5, "flex": 2.0,
                                                           "conv3x3": 0.5},
            "peak_mib": {"reference": 900.0, "tiled": 80.0, "triton": 40.0, "flex": 50.0, "conv3x3": 10.0}}
    (tmp_path / "flex.json").write_text(json.dumps(flex))
    gc.parse_flex(s, result(gc, ""), ["--json", str(tmp_path / "flex.json")])
    vit = ("vit_cifar  plain           2.1ms      1.0ms     2.10x            14.4MiB          9.8MiB   0.68\n"
           "vit_re     LSA            40.0ms     50.0ms     0.80x           174.6MiB         77.6MiB   0.44\n"
           "SDPA kernels usable by the plain vit_cifar layer (bf16): flash, efficient, cudnn, math\n"
           "SDPA kernels usable by the plain vit_re layer (bf16): efficient, math\n")
    gc.parse_vit(s, result(gc, vit), ["--device", "cuda", "--dtype", "bf16"])
    gc.parse_sasa_step(s, result(gc, "training step, batch 128, 32x32, bf16, cuda, median of 5\n"
                                     "conv resnet26        11.66      0.727      40.0    1.00x\n"
                                     "sasa_resnet26         8.30      0.806      60.0    1.50x\n"
                                     "PASS SASA step / conv step = 1.50x (target <= 2.0x)\n"), [])
    gc.parse_data_loader(s, result(gc, "DeviceLoader (crop+flip+normalise on cuda): 2,500,000 img/s\n"
                                       "DataLoader (2 workers, PIL + torchvision transforms): 6,000 img/s\n"
                                       "ratio: 416.7x\n"), ["--device", "cuda"])
    status = {c.name: c.status for c in s.checks}
    assert status["neighbourhood triton fwd+bwd vs FlexAttention (B=64, 4x16, 32x32, k=7, bf16)"] == "pass"
    assert status["FlexAttention window mask agrees with triton (B=64, 4x16, 32x32, k=7, bf16)"] == "pass"
    assert status["ViT attention vit_cifar plain, bf16: SDPA vs written out"] == "pass"
    assert status["ViT attention vit_re LSA, bf16: SDPA vs written out"] == "fail"
    assert status["ViT vit_cifar plain layer (bf16) can use flash attention"] == "pass"
    assert status["ViT vit_re plain layer (bf16) can use flash attention"] == "info"
    assert status["SASA-R26 / conv-R26 training step (batch 128, 32x32, bf16, cuda)"] == "pass"
    assert status["DeviceLoader (crop+flip+normalise) throughput"] == "pass"
    assert status["DeviceLoader / DataLoader (crop+flip+normalise)"] == "pass"


def probe(variant: str, losses, images_s, recompiles=0, limit_hits=0):
    epochs = [{"epoch": i + 1, "step": 50 * (i + 1), "train/loss": loss, "time/images_per_s": images_s,
               "time/epoch_s": 30.0 if i == 0 and variant == "compiled" else 3.0} for i, loss in enumerate(losses)]
    return {"variant": variant, "rc": 0, "error": "", "peak_mem_mb": 1234.5, "peak_mem_kind": "cuda_max_memory_allocated",
            "recompiles": recompiles, "recompile_limit_hits": limit_hits, "recompile_reasons": [],
            "graph_breaks": 2, "graph_break_reasons": ["2x a reason"], "unique_graphs": 3, "epochs": epochs}


SAN_CUDA = """
SAN bottleneck c=256 (rel 16, mid 64, share 8), k=7, 32x256x28x28, cuda, median of 5
| block | implementation | fwd+bwd (ms) | time vs unfold | saved for backward (MB) | memory vs unfold | largest |
| --- | --- | ---: | ---: | ---: | ---: | ---: |
| pairwise | unfold | 40.0 | 1.00x | 900.0 | 1.000 | 1 |
| pairwise | lean | 80.0 | 2.00x | 100.0 | 0.111 | 1 |
| patchwise | unfold | 30.0 | 1.00x | 700.0 | 1.000 | 1 |
| patchwise | lean | 20.0 | 0.67x | 420.0 | 0.600 | 1 |
FAIL
"""


def test_san_block_on_cuda_records_speed_against_unfold_and_judges_memory(gpu_session):
    gc, s = gpu_session
    gc.parse_san(s, gc.Result("python bench/san.py", 1, SAN_CUDA, 1.0, False), [])
    by_name = {c.name.split(" (")[0]: c for c in s.checks}
    assert by_name["SAN pairwise block: lean fwd+bwd vs unfold"].value == 0.5
    assert by_name["SAN patchwise block: lean fwd+bwd vs unfold"].value == 1.5
    assert by_name["SAN pairwise block: lean saved for backward / unfold's"].status == "pass"
    assert by_name["SAN patchwise block: lean saved for backward / unfold's"].status == "fail"
    with pytest.raises(ValueError):
        gc.parse_san(s, result(gc, "Traceback (most recent call last):"), [])


def test_training_records_loss_throughput_memory_and_recompilations(gpu_session):
    gc, s = gpu_session
    gc.record_training(s, "sasa eager", probe("eager", [2.3, 2.0, 1.8], 10000.0), result(gc, ""))
    gc.record_training(s, "sasa compiled", probe("compiled", [2.3, 2.1], 15000.0, recompiles=1), result(gc, ""))
    gc.record_training(s, "vit compiled", probe("compiled", [2.3, 2.4], 9000.0, recompiles=9, limit_hits=1),
                       result(gc, ""))
    by_name = {c.name: c for c in s.checks}
    assert by_name["sasa eager: train loss, last epoch / first"].status == "pass"
    assert by_name["sasa eager: peak memory"].value == 1234.5
    assert by_name["sasa compiled: throughput vs eager"].value == pytest.approx(1.5)
    assert by_name["sasa compiled: recompilations"].status == "pass"
    assert "27 s longer" in by_name["sasa compiled: training throughput"].note
    assert by_name["vit compiled: train loss, last epoch / first"].status == "fail"
    assert by_name["vit compiled: recompilations"].status == "fail"
    assert "vit compiled: throughput vs eager" not in by_name  # no eager figure to compare with


def test_pytest_summary_counts():
    gc = load_gpu_check()
    out = "....F\nFAILED tests/x.py::test_a - boom\n== 3 passed, 1 failed, 2 skipped, 700 deselected, 1 error in 9.1s =="
    assert gc.pytest_counts(out) == {"passed": 3, "failed": 1, "skipped": 2, "deselected": 700, "error": 1}
    assert gc.pytest_counts("no summary") == {}
    stopped = ("[gw0] [ 10%] PASSED tests/a.py::test_x[fp32]\n[gw3] [ 20%] FAILED tests/b.py::test_y\n"
               "tests/c.py::test_z PASSED                [ 30%]\n[gw1] [ 40%] SKIPPED tests/d.py::test_w\n")
    assert gc.pytest_verdicts(stopped) == ({"passed": 2, "failed": 1, "skipped": 1}, ["tests/b.py::test_y"])


def test_a_training_stopped_by_the_budget_reports_the_epochs_it_finished(gpu_session):
    gc, s = gpu_session
    stopped = gc.Result("python bench/train_probe.py", 1, "", 100.0, True)
    partial = {**probe("compiled", [2.3, 2.0], 12000.0), "rc": 130}
    gc.record_training(s, "san compiled", partial, stopped)
    gc.record_training(s, "aacn compiled", {**probe("compiled", [2.3], 1.0), "rc": 130}, stopped)
    by_name = {c.name: c for c in s.checks}
    assert "stopped there by the part's budget" in by_name["san compiled: train loss, last epoch / first"].note
    assert by_name["aacn compiled"].status == "skip" and "budget" in by_name["aacn compiled"].note
    # The budget's Ctrl-C reaches the run's children too: on the GPU it killed a Triton compile's ptxas.
    ptxas = {**probe("eager", [2.5], 97.0), "rc": 1, "error": "PTXASError: `ptxas` failed with error code -2"}
    gc.record_training(s, "adaptive_span eager", ptxas, stopped)
    gc.record_training(s, "vit eager", {**probe("eager", [2.3], 1.0), "rc": 1, "error": "RuntimeError: boom"},
                       gc.Result("python bench/train_probe.py", 1, "", 10.0, False))
    by_name = {c.name: c for c in s.checks}
    assert by_name["adaptive_span eager"].status == "skip" and "PTXASError" in by_name["adaptive_span eager"].note
    assert by_name["vit eager"].status == "error"


def test_a_command_out_of_time_gets_ctrl_c_then_is_killed(gpu_session):
    gc, s = gpu_session
    polite = ("import time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    print('summary so far')\n"
              "    raise SystemExit(130)\n")
    s.grace_s = 2
    # As under `nohup python bench/gpu_check.py &` without job control: this process ignores Ctrl-C, and its
    # commands must still get it.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        r = s.run([sys.executable, "-c", polite], timeout=5)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert r.timed_out and r.rc == 130 and "summary so far" in r.out
    deaf = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nprint('started', flush=True)\ntime.sleep(60)\n"
    r = s.run([sys.executable, "-c", deaf], timeout=5)
    assert r.timed_out and r.rc == -9 and r.seconds < 30
    s.failed("train", "deaf", r)
    assert s.checks[-1].status == "skip" and "time budget" in s.checks[-1].note


def test_reruns_name_families_and_commands_fit_their_time(gpu_session, monkeypatch):
    """--families trains only those; compiling runs keep Inductor in-process (its worker pool held a finished
    bench at exit on the first GPU run); each time chunk sets time.budget_s from its own timeout (the time task's
    35 s per model once made every chunk overrun)."""
    gc, s = gpu_session
    calls = []

    def fake_run(args, timeout, env=None):
        calls.append((args, timeout, env or {}))
        return gc.Result(gc.shlex.join(args), 1, "", 1.0, False)

    monkeypatch.setattr(s, "run", fake_run)
    s.families = ["vit", "san"]
    gc.part_train(s, gc.PartClock(gc.time.monotonic() + 400))
    trained = [(args[args.index("--config") + 1], args[args.index("--variants") + 1], env) for args, _, env in calls]
    assert [(config.split("/")[1], variant) for config, variant, _ in trained] == [
        ("vit", "eager"), ("san", "eager"), ("vit", "compiled"), ("san", "compiled")]
    assert all(("TORCHINDUCTOR_COMPILE_THREADS" in env) == (variant == "compiled") for _, variant, env in trained)

    calls.clear()
    gc.part_time(s, gc.PartClock(gc.time.monotonic() + 90))
    assert len(calls) == 3
    for args, timeout, _ in calls:
        models = args.count("--config")
        budget = float(next(a for a in args if a.startswith("time.budget_s=")).split("=")[1])
        assert 0 < budget * models <= 0.5 * timeout + 1e-9

"""Hostile-input audit: the project's promises tried the way an attacker or an unlucky user would.

    nice -n 10 python bench/hostile.py [--repo DIR] [--only CLASS ...] [--fuzz N] [--keep]

Not a speed benchmark: it counts, for each class of issue 14 (and the signal and resume items of
issue 20), the cases tried and the cases that behave. A bad input behaves when `main.py` exits 2
with exactly one line on stderr starting with `error:`, no traceback, and nothing written; a
killed, interrupted or diverged run behaves when nothing is lost and no number comes from the
wrong weights (resuming ends with exactly the uninterrupted run's result).

Every case runs `main.py` of --repo (default: this checkout) in a subprocess, so the script can
audit an older checkout too (e.g. `git archive <commit> | tar -x -C /tmp/old`). Kill moments are
injected from outside the code under test: a wrapper patches `os.replace` and the engine's
`_finish` to SIGKILL the process at the n-th checkpoint rename, so old and new code are cut at the
same moments. The checkpoint fuzz (class 5) loads --fuzz corrupted copies of a real checkpoint in
one process.

Prints one line per case (`ok` or `FAIL` with the reason) and, at the end, the counts per class.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import defaultdict
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(HERE))
from tests.helpers import TINY_CONFIG, deep_update  # noqa: E402

TINY = deep_update(TINY_CONFIG, {"data": {"num_workers": 0}, "log": {"tensorboard": False}})

# Runs main.py with checkpoint renames and the final evaluation instrumented. AUDIT_KILL=WHEN@N kills the
# process (SIGKILL) at the N-th moment WHEN: just before or after a rename onto a .ckpt file, or at the start
# of the final test evaluation (finish); AUDIT_SIGNAL=NAME@WHEN@N[,...] sends signals instead.
WRAPPER = textwrap.dedent(r'''
    import os, signal, sys, runpy
    repo = sys.argv[1]
    sys.argv = [os.path.join(repo, "main.py")] + sys.argv[2:]
    sys.path.insert(0, repo)
    specs = []
    if os.environ.get("AUDIT_KILL"):
        when, nth = os.environ["AUDIT_KILL"].split("@")
        specs.append((signal.SIGKILL, when, int(nth)))
    for item in filter(None, os.environ.get("AUDIT_SIGNAL", "").split(",")):
        name, when, nth = item.split("@")
        specs.append((getattr(signal, name), when, int(nth)))
    counts = {}

    def hit(moment):
        counts[moment] = counts.get(moment, 0) + 1
        for sig, when, nth in specs:
            if when == moment and counts[moment] == nth:
                os.kill(os.getpid(), sig)

    real_replace = os.replace

    def replace(src, dst):
        onto_ckpt = str(dst).endswith(".ckpt")
        if onto_ckpt:
            hit("before")
        real_replace(src, dst)
        if onto_ckpt:
            hit("after")

    os.replace = replace
    if any(when == "finish" for _, when, _ in specs):
        import common.train.engine as engine
        real_finish = engine.Trainer._finish

        def finish(self, *args, **kwargs):
            hit("finish")
            return real_finish(self, *args, **kwargs)

        engine.Trainer._finish = finish
    runpy.run_path(sys.argv[0], run_name="__main__")
''')

# A package for class 2: models whose weights turn NaN while the loss stays finite, or whose loss
# turns NaN at a given training forward unless AUDIT_CALM is set.
HOSTILE_MODELS = textwrap.dedent(r'''
    import os
    import torch
    from torch import nn
    from common.registry import register_model


    class _Net(nn.Module):
        def __init__(self, num_classes, bad_call, kind):
            super().__init__()
            self.fc = nn.Linear(3, num_classes)
            self.p = nn.Parameter(torch.zeros(()))
            self.calls, self.bad_call, self.kind = 0, bad_call, kind

        def forward(self, x):
            out = self.fc(x.mean((2, 3)))
            if self.training:
                self.calls += 1
                if self.calls == self.bad_call and not os.environ.get("AUDIT_CALM"):
                    if self.kind == "weights":  # d sqrt(u)/du at 0 is inf: the gradient is 0 * inf = nan
                        out = out + 0 * torch.sqrt(self.p - self.p)
                    else:
                        out = out * float("nan")
            return out


    @register_model
    def audit_nan_weights(num_classes: int = 10, bad_call: int = 4):
        return _Net(num_classes, bad_call, "weights")


    @register_model
    def audit_nan_loss(num_classes: int = 10, bad_call: int = 6):
        return _Net(num_classes, bad_call, "loss")
''')


class Audit:
    def __init__(self, repo: Path, work: Path):
        self.repo, self.work = repo, work
        self.results: dict[str, list[tuple[str, bool, str]]] = defaultdict(list)
        self.counter = 0
        pkgs = work / "pkgs" / "audit_models"
        pkgs.mkdir(parents=True)
        (pkgs / "__init__.py").write_text(HOSTILE_MODELS)
        (work / "wrapper.py").write_text(WRAPPER)

    # ---------------------------------------------------------------- running

    def fresh(self, name: str) -> Path:
        self.counter += 1
        folder = self.work / f"{self.counter:03d}_{name}"
        folder.mkdir()
        return folder

    def config(self, folder: Path, changes: dict | None = None, name: str = "tiny", drop_model=False) -> Path:
        base = {k: v for k, v in TINY.items() if not (drop_model and k == "model")}
        cfg = deep_update(base, changes or {})
        cfg.setdefault("output_root", str(folder / "runs"))
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    def env(self, extra: dict | None = None) -> dict:
        return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(self.work / "pkgs"), **(extra or {})}

    def main(self, *args, cwd=None, env=None, timeout=600, fsize=None, wrapper=False):
        cmd = [sys.executable, str(self.work / "wrapper.py"), str(self.repo), *args] if wrapper else \
            [sys.executable, str(self.repo / "main.py"), *args]

        def limit():
            if fsize is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

        try:
            return subprocess.run(cmd, cwd=cwd or self.work, capture_output=True, text=True, timeout=timeout,
                                  env=self.env(env), preexec_fn=limit)
        except subprocess.TimeoutExpired as exc:
            return subprocess.CompletedProcess(cmd, -999, exc.stdout or "", f"TIMEOUT after {timeout}s")

    def record(self, cls: str, name: str, ok: bool, why: str = "") -> None:
        self.results[cls].append((name, ok, why))
        line = f"[{cls}] {'ok  ' if ok else 'FAIL'} {name}" + ("" if ok else f": {why}")
        print(line, flush=True)

    # ---------------------------------------------------------------- judgements

    @staticmethod
    def one_line_error(result) -> str:
        """'' if the result is exit 2 with one `error:` line and no traceback, else what is wrong."""
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        if result.returncode != 2:
            return f"exit {result.returncode}; stderr tail: {_tail(result.stderr)}"
        if "Traceback" in result.stderr:
            return f"traceback: {_tail(result.stderr)}"
        if len(lines) != 1 or not lines[0].startswith("error: "):
            return f"{len(lines)} stderr lines: {_tail(result.stderr)}"
        return ""

    def bad_input(self, cls: str, name: str, args: list, folder: Path, untouched=(), contains: str = "",
                  **kwargs) -> None:
        """A bad input: one line, exit 2, and nothing written under folder except what was there before."""
        before = _snapshot(folder)
        result = self.main(*args, **kwargs)
        why = self.one_line_error(result)
        if not why and contains and contains not in result.stderr:
            why = f"message lacks {contains!r}: {_tail(result.stderr)}"
        if not why:
            after = _snapshot(folder)
            changed = sorted(set(after) - set(before)) + sorted(k for k in before if after.get(k) != before[k])
            changed = [c for c in changed if "__pycache__" not in c]
            if changed:
                why = f"wrote or changed {changed[:4]}"
        self.record(cls, name, not why, why)

    # ---------------------------------------------------------------- class 1: kill at every moment

    def class_1(self) -> None:
        folder = self.fresh("kill")
        path = self.config(folder, {"deterministic": True, "train": {"epochs": 3, "keep_every_epochs": 2},
                                    "data": {"synthetic": {"train_size": 200}}})
        reference = folder / "reference"
        result = self.main("--config", str(path), "--output", str(reference))
        if result.returncode != 0:
            self.record("1", "reference run", False, _tail(result.stderr))
            return
        ref = _outcome(reference)
        moments = [("finish", 1)] + [(when, n) for n in range(1, 40) for when in ("before", "after")]
        for when, n in moments:
            out = folder / f"killed_{when}_{n}"
            killed = self.main("--config", str(path), "--output", str(out), wrapper=True,
                               env={"AUDIT_KILL": f"{when}@{n}"})
            if killed.returncode == 0:
                break  # fewer renames than n: every moment has been tried
            name = f"SIGKILL {when} checkpoint rename #{n}" if when != "finish" else "SIGKILL before the test eval"
            if killed.returncode != -signal.SIGKILL:
                self.record("1", name, False, f"killed run exited {killed.returncode}: {_tail(killed.stderr)}")
                continue
            resumed = self.main("--config", str(path), "--output", str(out))
            why = "" if resumed.returncode == 0 else f"resume exit {resumed.returncode}: {_tail(resumed.stderr)}"
            if not why:
                got = _outcome(out)
                diffs = [k for k in ref if got.get(k) != ref[k]]
                why = f"differs from the uninterrupted run in {diffs}" if diffs else ""
            self.record("1", name, not why, why)

    # ---------------------------------------------------------------- class 2: non-finite training

    def class_2(self) -> None:
        folder = self.fresh("nan_weights")
        path = self.config(folder, {"model": {"name": "audit_nan_weights"}, "custom_imports": ["audit_models"],
                                    "train": {"epochs": 2}}, drop_model=True)
        out = folder / "run"
        result = self.main("--config", str(path), "--output", str(out))
        why = _nonfinite_verdict(result, out)
        self.record("2", "weights turn NaN, loss stays finite: no NaN checkpoint, one line", not why, why)

        folder = self.fresh("nan_loss")
        path = self.config(folder, {"train": {"epochs": 2}, "log": {"every_steps": 1}})
        out = folder / "run"
        result = self.main("--config", str(path), "--output", str(out), "--set", "train.optimizer.lr=1e30")
        why = _nonfinite_verdict(result, out)
        self.record("2", "lr 1e30: the loss diverges, one line, nothing non-finite saved", not why, why)

        folder = self.fresh("nan_then_lower_lr")
        path = self.config(folder, {"model": {"name": "audit_nan_loss", "bad_call": 6},
                                    "custom_imports": ["audit_models"], "train": {"epochs": 3},
                                    "log": {"every_steps": 1}}, drop_model=True)
        out = folder / "run"
        result = self.main("--config", str(path), "--output", str(out))
        why = _nonfinite_verdict(result, out)
        if not why and not (out / "last.ckpt").exists():
            why = "no checkpoint before the divergence"
        if not why:
            line = result.stderr.strip().splitlines()[-1]
            if "lr" not in line:
                why = f"the message offers no way to continue with another lr: {line}"
        if not why:
            again = self.main("--config", str(path), "--output", str(out), "--set", "train.optimizer.lr=0.01",
                              "--allow-change", "train.optimizer.lr", env={"AUDIT_CALM": "1"})
            why = "" if again.returncode == 0 else f"resume with a lower lr: exit {again.returncode}: " \
                                                   f"{_tail(again.stderr)}"
            if not why:
                saved = yaml.safe_load((out / "config.yaml").read_text())
                if saved["train"]["optimizer"]["lr"] != 0.01:
                    why = "config.yaml does not record the new lr"
        self.record("2", "diverged run continues from the last good checkpoint with a lower lr", not why, why)

    # ---------------------------------------------------------------- class 3: config values

    def class_3(self) -> None:
        nan_keys = ["train.optimizer.lr", "train.optimizer.momentum", "train.optimizer.weight_decay",
                    "train.optimizer.eps", "train.schedule.warmup_epochs", "train.schedule.warmup_start_factor",
                    "train.schedule.eta_min", "train.schedule.gamma", "train.label_smoothing", "train.grad_clip",
                    "train.ema_decay", "train.bn_momentum", "data.val_fraction", "data.synthetic.noise",
                    "data.augment.erase_prob", "data.augment.erase_min_aspect", "data.augment.mixup_alpha",
                    "data.augment.cutmix_alpha", "data.augment.mix_prob", "data.augment.mix_switch_prob"]
        sets = [f"{key}=.nan" for key in nan_keys]
        sets += [f"{key}=.inf" for key in ("train.optimizer.lr", "train.optimizer.weight_decay",
                                           "train.schedule.eta_min", "train.schedule.gamma", "train.grad_clip",
                                           "data.augment.mixup_alpha", "train.schedule.warmup_epochs")]
        sets += ["data.mean=[.nan, 0.5, 0.5]", "data.std=[.inf, 0.2, 0.2]", "train.schedule.milestones=[.inf]",
                 "data.augment.erase_area=[.nan, 0.3]", "train.optimizer.betas=[.nan, 0.99]",
                 "seed=1180591620717411303424", "data.split_seed=1180591620717411303424",
                 "data.synthetic.seed=-1180591620717411303424", "train.epochs=100000000000000000000000000000",
                 "train.batch_size=1000000000000000000000", "train.eval_batch_size=1000000000000000000000",
                 "log.every_steps=100000000000000000000000000", "data.num_workers=100000000000",
                 "data.synthetic.train_size=10000000000000", "train.keep_every_epochs=100000000000000000000",
                 "model.widths=[a, b]", "model.layers=5", "model.stem_width=-3", "model.widths=[-8, 16]",
                 "model.block=3", "model.dropout=.nan", "model.stem_width=1.5", "model.layers=[1, 1, 1]",
                 "model.zero_init_residual=maybe", "model.mixer_kwargs=7"]
        for item in sets:
            folder = self.fresh("set")
            path = self.config(folder, {"train": {"epochs": 1}})
            self.bad_input("3", f"--set {item}", ["--config", str(path), "--set", item, "--output",
                                                  str(folder / "out")], folder, timeout=300)

        texts = {
            "invalid UTF-8": b"seed: 1\nname: \xff\xfe\n",
            "duplicate top-level key": b"seed: 1\nseed: 2\n",
            "duplicate nested key": b"train:\n  epochs: 1\n  epochs: 2\n",
            "empty file": b"",
            "comments only": b"# nothing here\n",
            "non-string key": b"1: 2\n",
            "deep nesting": b"seed: " + b"[" * 20000 + b"]" * 20000 + b"\n",
            "binary garbage": bytes(random.Random(0).randrange(256) for _ in range(300)),
            "a list, not a mapping": b"- 1\n- 2\n",
            "tab indentation": b"train:\n\tepochs: 1\n",
        }
        for name, text in texts.items():
            folder = self.fresh("yaml")
            path = folder / "bad.yaml"
            path.write_bytes(text)
            self.bad_input("3", f"config file: {name}", ["--config", str(path), "--output", str(folder / "out")],
                           folder)
        folder = self.fresh("yaml_base")
        (folder / "base.yaml").write_bytes(b"seed: \xff\n")
        path = self.config(folder, {"base": "base.yaml"})
        self.bad_input("3", "base file with invalid UTF-8", ["--config", str(path), "--output", str(folder / "out")],
                       folder)
        folder = self.fresh("yaml_dir")
        (folder / "dir.yaml").mkdir()
        self.bad_input("3", "config path is a folder", ["--config", str(folder / "dir.yaml")], folder)

    # ---------------------------------------------------------------- class 4: output folders, disk full

    def class_4(self) -> None:
        folder = self.fresh("outputs")
        path = self.config(folder, {"train": {"epochs": 1}})
        run = folder / "run"
        self.main("--config", str(path), "--output", str(run))
        a_file = folder / "a_file"
        a_file.write_text("x")
        cases = [
            ("train --output is a file", ["--config", str(path), "--output", str(a_file)]),
            ("train --output under a file", ["--config", str(path), "--output", str(a_file / "sub")]),
            ("train --output not creatable (/sys)", ["--config", str(path), "--output", "/sys/audit_run"]),
            ("train output_root not creatable", ["--config", str(path), "--set", "output_root=/sys/audit"]),
            ("eval --output is a file", ["--task", "eval", "--load", str(run), "--output", str(a_file)]),
            ("eval --output not creatable", ["--task", "eval", "--load", str(run), "--output", "/sys/audit_eval"]),
            ("time --output is a file", ["--task", "time", "--config", str(path), "--output", str(a_file),
                                         "--set", "time.iters=1", "--set", "time.warmup=0",
                                         "--set", "time.latency_iters=1"]),
            ("time --output not creatable", ["--task", "time", "--config", str(path), "--output", "/sys/audit_t",
                                             "--set", "time.iters=1", "--set", "time.warmup=0",
                                             "--set", "time.latency_iters=1"]),
            ("report --output is a file", ["--task", "report", "--runs", str(run), "--output", str(a_file)]),
            ("report --output not creatable", ["--task", "report", "--runs", str(run), "--output", "/sys/audit_r"]),
        ]
        for name, args in cases:
            self.bad_input("4", name, args, folder)

        # Disk full, simulated with a file-size limit: writes past it fail (EFBIG) like a full disk (ENOSPC).
        folder = self.fresh("disk_full_train")
        path = self.config(folder, {"train": {"epochs": 2}})
        run = folder / "run"
        first = self.main("--config", str(path), "--output", str(run), "--set", "train.epochs=1")
        before = (run / "last.ckpt").read_bytes() if first.returncode == 0 else b""
        limit = max(4096, len(before) // 2)
        result = self.main("--config", str(path), "--output", str(run), fsize=limit)
        why = self.one_line_error(result)
        leftovers = [p.name for p in run.rglob("*") if p.is_file() and (p.name.endswith(".tmp") or
                                                                         p.stat().st_size == 0)]
        if not why and (run / "last.ckpt").read_bytes() != before:
            why = "the earlier last.ckpt changed"
        if not why and leftovers:
            why = f"left {leftovers}"
        self.record("4", "disk full while training: one line, earlier checkpoint kept, no partial file",
                    not why, why)

        folder = self.fresh("disk_full_eval")
        path = self.config(folder, {"train": {"epochs": 1}})
        run = folder / "run"
        self.main("--config", str(path), "--output", str(run))
        result = self.main("--task", "eval", "--load", str(run), fsize=64)
        why = self.one_line_error(result)
        if not why and (run / "eval.json").exists():
            why = f"left eval.json of {(run / 'eval.json').stat().st_size} bytes"
        if not why:
            leftovers = [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
            why = f"left {leftovers}" if leftovers else ""
        self.record("4", "disk full while writing eval.json: one line, no partial file", not why, why)

    # ---------------------------------------------------------------- class 5: checkpoint fuzz

    def class_5(self, n: int) -> None:
        folder = self.fresh("fuzz")
        path = self.config(folder, {"train": {"epochs": 1}})
        run = folder / "run"
        if self.main("--config", str(path), "--output", str(run)).returncode != 0:
            self.record("5", "fuzz setup", False, "training failed")
            return
        script = textwrap.dedent(r'''
            import random, sys, torch
            sys.path.insert(0, sys.argv[1])
            from pathlib import Path
            from common.errors import UserError
            from common.train import checkpoint as ckpt
            good = Path(sys.argv[2]).read_bytes()
            reference = ckpt.load_checkpoint(sys.argv[2])
            rng, n, work = random.Random(0), int(sys.argv[3]), Path(sys.argv[4])

            def same(a, b):
                if isinstance(a, torch.Tensor):
                    return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
                        torch.equal(a, b)
                if isinstance(a, dict):
                    return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
                if isinstance(a, (list, tuple)):
                    return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same, a, b))
                return a == b

            tally = {}
            for i in range(n):
                kind = ("flip", "flip", "flip", "bytes", "truncate", "random")[i % 6]
                data = bytearray(good)
                if kind == "flip":
                    pos = rng.randrange(len(data))
                    data[pos] ^= 1 << rng.randrange(8)
                elif kind == "bytes":
                    for _ in range(rng.randrange(1, 8)):
                        data[rng.randrange(len(data))] = rng.randrange(256)
                elif kind == "truncate":
                    data = data[:rng.randrange(len(data))]
                else:
                    data = bytearray(rng.randbytes(rng.randrange(1, 4096)))
                bad = work / "fuzzed.ckpt"
                bad.write_bytes(bytes(data))
                try:
                    loaded = ckpt.load_checkpoint(bad)
                except UserError as exc:
                    text = str(exc)
                    verdict = "ok" if "\n" not in text and "weights_only" not in text else "bad message"
                except Exception as exc:
                    verdict = f"escaped {type(exc).__name__}"
                else:
                    verdict = "ok" if same(loaded, reference) else "loaded different contents silently"
                tally.setdefault(kind + ": " + verdict, 0)
                tally[kind + ": " + verdict] += 1
            for key, value in sorted(tally.items()):
                print(f"{value}\t{key}")
        ''')
        (folder / "fuzz.py").write_text(script)
        result = subprocess.run([sys.executable, str(folder / "fuzz.py"), str(self.repo), str(run / "last.ckpt"),
                                 str(n), str(folder)], capture_output=True, text=True, env=self.env())
        if result.returncode != 0:
            self.record("5", "fuzz harness", False, _tail(result.stderr))
            return
        for line in result.stdout.splitlines():
            count, label = line.split("\t")
            ok = label.endswith(": ok")
            self.results["5"] += [(label, ok, label)] * int(count)
            print(f"[5] {'ok  ' if ok else 'FAIL'} {count} fuzzed checkpoints: {label}", flush=True)
        folder = self.fresh("foreign")
        foreign = folder / "foreign.ckpt"
        code = (f"import torch, collections; torch.save({{'w': collections.OrderedDict(a=torch.zeros(2)), "
                f"'x': __import__('fractions').Fraction(1, 3)}}, {str(foreign)!r})")
        subprocess.run([sys.executable, "-c", code], check=True)
        result = self.main("--task", "eval", "--load", str(foreign))
        why = self.one_line_error(result) or ("suggests weights_only=False" if "weights_only" in result.stderr
                                              else "")
        self.record("5", "a pickle with foreign objects: refused in our own words", not why, why)

    # ---------------------------------------------------------------- class 6: resume and runs

    def class_6(self) -> None:
        folder = self.fresh("torn_metrics")
        path = self.config(folder)
        run = folder / "run"
        self.main("--config", str(path), "--output", str(run))
        with open(run / "metrics.jsonl", "a") as f:
            f.write('{"epoch": 3, "train/lo')
        result = self.main("--config", str(path), "--output", str(run), "--set", "train.epochs=3")
        why = "" if result.returncode == 0 else f"exit {result.returncode}: {_tail(result.stderr)}"
        if not why:
            epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
            why = "" if epochs == [1, 2, 3] else f"metrics.jsonl epochs {epochs}"
        self.record("6", "torn last line of metrics.jsonl: resume works", not why, why)

        folder = self.fresh("concurrent")
        path = self.config(folder, {"train": {"epochs": 3}, "data": {"synthetic": {"train_size": 3000}}})
        run = folder / "run"
        first = subprocess.Popen([sys.executable, str(self.repo / "main.py"), "--config", str(path), "--output",
                                  str(run)], cwd=self.work, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=self.env())
        deadline = time.time() + 300
        while not (run / "config.yaml").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        second = self.main("--config", str(path), "--output", str(run))
        _, err = first.communicate(timeout=600)
        why = self.one_line_error(second)
        if not why and first.returncode != 0:
            why = f"the first training failed: {_tail(err)}"
        if not why:
            epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
            why = "" if epochs == [1, 2, 3] else f"metrics.jsonl epochs {epochs}"
        self.record("6", "a second training into the same --output: one line, the first unharmed", not why, why)

        folder = self.fresh("orphan_tmp")
        path = self.config(folder)
        run = folder / "run"
        self.main("--config", str(path), "--output", str(run), "--set", "train.epochs=1")
        orphan = run / ".last.ckpt.999999.tmp"
        orphan.write_bytes(b"partial checkpoint from a killed write")
        result = self.main("--config", str(path), "--output", str(run))
        why = "" if result.returncode == 0 else f"exit {result.returncode}: {_tail(result.stderr)}"
        if not why and orphan.exists():
            why = "the orphaned .tmp file is still there after the resume"
        self.record("6", "orphaned *.tmp of a killed write is cleaned on resume", not why, why)

        folder = self.fresh("fewer_epochs")
        path = self.config(folder, {"train": {"epochs": 2}})
        run = folder / "run"
        self.main("--config", str(path), "--output", str(run))
        self.bad_input("6", "resume with fewer epochs than done: refused, config.yaml kept",
                       ["--config", str(path), "--output", str(run), "--set", "train.epochs=1"], folder)

    # ---------------------------------------------------------------- class 7: signals

    def class_7(self) -> None:
        folder = self.fresh("sigint_test_eval")
        path = self.config(folder)
        run = folder / "run"
        result = self.main("--config", str(path), "--output", str(run), wrapper=True,
                           env={"AUDIT_SIGNAL": "SIGINT@finish@1"})
        why = "" if result.returncode == 130 else f"exit {result.returncode}: {_tail(result.stderr)}"
        if not why and (run / "summary.json").exists():
            why = "summary.json written although the test evaluation was interrupted"
        if not why:
            again = self.main("--config", str(path), "--output", str(run))
            why = "" if again.returncode == 0 and (run / "summary.json").exists() else \
                f"resume exit {again.returncode}: {_tail(again.stderr)}"
        self.record("7", "SIGINT during the final test evaluation: exit 130, resume finishes", not why, why)

        for name, signum in (("SIGHUP", signal.SIGHUP), ("SIGTERM", signal.SIGTERM)):
            folder = self.fresh(name.lower())
            path = self.config(folder, {"train": {"epochs": 3}})
            run = folder / "run"
            # The signal arrives right after the first checkpoint (epoch 1's end): the run must save and stop.
            result = self.main("--config", str(path), "--output", str(run), wrapper=True,
                               env={"AUDIT_SIGNAL": f"{name}@after@1"})
            why = "" if result.returncode == 128 + signum else f"exit {result.returncode}: {_tail(result.stderr)}"
            if not why:
                again = self.main("--config", str(path), "--output", str(run))
                why = "" if again.returncode == 0 else f"resume exit {again.returncode}: {_tail(again.stderr)}"
            self.record("7", f"{name} during training: exit {128 + signum}, checkpoint saved, resume finishes",
                        not why, why)

        folder = self.fresh("second_ctrl_c")
        path = self.config(folder, {"train": {"epochs": 3, "checkpoint_every_steps": 2}})
        run = folder / "run"
        # First Ctrl-C after the first (mid-epoch) checkpoint; the second while the stop's checkpoint is saved.
        result = self.main("--config", str(path), "--output", str(run), wrapper=True,
                           env={"AUDIT_SIGNAL": "SIGINT@after@1,SIGINT@before@2"})
        why = "" if result.returncode == 130 else f"exit {result.returncode}: {_tail(result.stderr)}"
        if not why:
            again = self.main("--config", str(path), "--output", str(run))
            why = "" if again.returncode == 0 else f"resume exit {again.returncode}: {_tail(again.stderr)}"
        self.record("7", "a second Ctrl-C during the save: exit 130, a checkpoint intact", not why, why)

    # ---------------------------------------------------------------- class 8: data

    def class_8(self) -> None:
        from PIL import Image
        import numpy as np

        folder = self.fresh("corrupt_image")
        root = folder / "images"
        for split in ("train", "val"):
            for cls in ("a", "b"):
                (root / split / cls).mkdir(parents=True)
                for i in range(4):
                    Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8)).save(root / split / cls / f"{i}.png")
        (root / "train" / "a" / "zz.png").write_bytes(b"not a png")
        # mean and std given: an imagefolder has no standard statistics, and without them the run stops on that
        # (one line too) before it reads an image
        path = self.config(folder, {"data": {"dataset": "imagefolder", "root": str(root), "image_size": 8,
                                             "val_fraction": 0.0, "mean": [0.5] * 3, "std": [0.25] * 3},
                                    "train": {"batch_size": 2}})
        self.bad_input("8", "imagefolder with a corrupt image: one line, no run folder",
                       ["--config", str(path), "--output", str(folder / "run")], folder, contains="zz.png")
        folder = self.fresh("fp16_cpu")
        path = self.config(folder)
        self.bad_input("8", "train.amp=fp16 on the CPU: one line, no run folder",
                       ["--config", str(path), "--output", str(folder / "run"), "--set", "train.amp=fp16"], folder)

        folder = self.fresh("png16")
        image = folder / "gray16.png"
        Image.fromarray(np.full((32, 32), 1000, np.uint16)).save(image)
        code = textwrap.dedent(f'''
            import sys; sys.path.insert(0, {str(self.repo)!r})
            from common.config import DataConfig
            from common.inspect.viz import image_from_file
            picture = image_from_file({str(image)!r}, DataConfig(), (3, 32, 32))
            print(float(picture.display.mean()))
        ''')
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=self.env())
        try:
            value = float(result.stdout.strip().splitlines()[-1])
            why = "" if abs(value - 1000 / 65535) < 0.01 else f"grey 1000/65535 shown as {value:.3f}"
        except (ValueError, IndexError):
            why = _tail(result.stderr)
        self.record("8", "a 16-bit PNG is scaled, not saturated", not why, why)

    # ---------------------------------------------------------------- class 9: CLI

    def class_9(self) -> None:
        folder = self.fresh("cli")
        path = self.config(folder)
        cases = [
            ("unknown task", ["--config", str(path), "--task", "trian"], "did you mean 'train'"),
            ("unknown task, no config", ["--task", "trian"], "did you mean 'train'"),
            ("unknown option", ["--confg", str(path)], "--config"),
            ("bad --pixel", ["--config", str(path), "--task", "viz_1", "--pixel", "a", "b"], "--pixel"),
            ("--pixel with one value", ["--config", str(path), "--task", "viz_1", "--pixel", "3"], "--pixel"),
            ("--index not a number", ["--config", str(path), "--task", "viz", "--index", "x"], "--index"),
            ("--set nosuch.deep.key=3", ["--config", str(path), "--set", "nosuch.deep.key=3"], "--set"),
            ("--set train.nosuch.deep=3", ["--config", str(path), "--set", "train.nosuch.deep=3"], "--set"),
        ]
        for name, args, contains in cases:
            self.bad_input("9", name, args, folder, contains=contains)
        folder = self.fresh("report_text_acc")
        run = folder / "runs" / "r1"
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"name": "r", "seed": 0, "model": {"name": "resnet18"}}))
        (run / "summary.json").write_text(json.dumps({"test_acc": "ninety", "best_val_acc": 0.9, "config": "r",
                                                      "model": "resnet18"}))
        result = self.main("--task", "report", "--runs", str(folder / "runs"), "--output", str(folder / "rep"))
        why = "" if result.returncode in (0, 2) and "Traceback" not in result.stderr else \
            f"exit {result.returncode}: {_tail(result.stderr)}"
        self.record("9", "report over a summary.json with a non-numeric accuracy", not why, why)

    # ---------------------------------------------------------------- issue 20: resume choice

    def resume_choice(self) -> None:
        folder = self.fresh("resume_choice")
        path = self.config(folder, {"train": {"epochs": 1}})
        good = self.main("--config", str(path))
        time.sleep(1.1)  # run folders are named by the second
        other = self.main("--config", str(path), "--set", "train.optimizer.lr=0.01")
        runs = sorted((folder / "runs" / "tiny").iterdir())
        if good.returncode or other.returncode or len(runs) != 2:
            self.record("20.6", "setup", False, _tail(good.stderr + other.stderr))
            return
        result = self.main("--config", str(path), "--resume", "--set", "train.epochs=2")
        why = "" if result.returncode == 0 else f"exit {result.returncode}: {_tail(result.stderr)}"
        if not why:
            epochs = [len((r / "metrics.jsonl").read_text().splitlines()) for r in runs]
            why = "" if epochs == [2, 1] else f"resumed the wrong run (epochs per run {epochs})"
        self.record("20.6", "--resume picks the newest run whose config matches", not why, why)
        result = self.main("--config", str(path), "--resume", "--set", "train.optimizer.momentum=0.5")
        why = self.one_line_error(result) or ("" if runs[0].name in result.stderr else
                                              f"does not list the folders: {_tail(result.stderr)}")
        self.record("20.6", "--resume with no matching run lists the folders", not why, why)

    def report(self) -> int:
        print("\n== hostile-input audit of", self.repo, "==")
        total = good = 0
        for cls in sorted(self.results, key=lambda c: [int(x) for x in c.split(".")]):
            cases = self.results[cls]
            ok = sum(1 for _, passed, _ in cases if passed)
            total, good = total + len(cases), good + ok
            print(f"class {cls:>5}: {ok:>4} of {len(cases):>4} behave")
        print(f"all        : {good:>4} of {total:>4} behave")
        return 0 if good == total else 1


def _nonfinite_verdict(result, out: Path) -> str:
    import torch

    if result.returncode != 2 or "Traceback" in result.stderr:
        return f"exit {result.returncode}: {_tail(result.stderr)}"
    for path in out.rglob("*.ckpt"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        for part in ("model", "ema", "optimizer"):
            tensors = _tensors(state.get(part))
            if any(t.is_floating_point() and not torch.isfinite(t).all() for t in tensors):
                return f"{path.name} holds non-finite {part} state"
    line = result.stderr.strip().splitlines()[-1]
    if "last good checkpoint" in line and not (out / "last.ckpt").exists():
        return "names a last good checkpoint that does not exist"
    return ""


def _tensors(obj) -> list:
    import torch

    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _outcome(run: Path) -> dict:
    """What a finished run must agree on with its uninterrupted twin."""
    import torch

    out = {}
    if (run / "summary.json").exists():
        summary = json.loads((run / "summary.json").read_text())
        out.update({k: summary.get(k) for k in ("test_acc", "test_loss", "best_val_acc", "best_epoch", "epochs",
                                                "test_checkpoint")})
    else:
        out["summary"] = "missing"
    for name in ("best.ckpt", "last.ckpt", "epochs/epoch_0002.ckpt", "epochs/epoch_0003.ckpt"):
        path = run / name
        if not path.exists():
            out[name] = "missing"
            continue
        state = torch.load(path, map_location="cpu", weights_only=True)
        digest = [float(t.double().sum()) for t in _tensors(state.get("model"))]
        out[name] = (state["state"]["epoch"], digest)
    if (run / "metrics.jsonl").exists():
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        out["metrics"] = [(r["epoch"], r.get("val/acc"), r.get("train/loss")) for r in records]
    out["tmp files"] = sorted(p.name for p in run.rglob("*.tmp"))
    return out


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "dir"
            for p in folder.rglob("*")}


def _tail(text: str, n: int = 240) -> str:
    text = " | ".join(line for line in text.strip().splitlines()[-3:])
    return text[-n:]


CLASSES = {"1": "class_1", "2": "class_2", "3": "class_3", "4": "class_4", "5": "class_5", "6": "class_6",
           "7": "class_7", "8": "class_8", "9": "class_9", "20.6": "resume_choice"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=HERE, help="checkout whose main.py to audit")
    parser.add_argument("--only", nargs="*", choices=sorted(CLASSES), help="classes to run (default: all)")
    parser.add_argument("--fuzz", type=int, default=600, help="corrupted checkpoints to load (class 5)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hostile_"))
    audit = Audit(args.repo.resolve(), work)
    print(f"auditing {audit.repo}; work folder {work}; load average {os.getloadavg()[0]:.1f}")
    try:
        for cls in args.only or CLASSES:
            method = getattr(audit, CLASSES[cls])
            method(args.fuzz) if cls == "5" else method()
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    return audit.report()


if __name__ == "__main__":
    sys.exit(main())

"""What a user reads to judge throughput: TensorBoard scalars, metrics.jsonl, the profiler trace, and
the promise that logging every N steps reads the device once per N steps, not every step.

One short training run (2 epochs x 6 steps, log_every=4, mixup, profiler window wait=1 warmup=1
active=2) serves the checks; it takes about 10 s on 2 idle cores. tests/gpu/test_gpu_observability.py
repeats the promises on a CUDA device (tests/gpu_check.sh), where a host read is a real device sync.
"""

from __future__ import annotations

import collections
import json

import pytest
import torch

from invasive_dist import train as train_mod
from invasive_dist.cli import main
from invasive_dist.config import ProfileConfig
from invasive_dist.data.torch_backend import TorchLoader
from invasive_dist.metrics import read_metrics
from invasive_dist.profiling import ProfilerWindow

from ..conftest import FAST_TRAIN

PERF_TAGS = {
    "perf/data_wait_frac",
    "perf/step_time_s",
    "perf/img_per_s",
    "perf/img_per_s_per_device",
    "perf/max_mem_bytes",
    "perf/world_size",
    "perf/epoch_time_s",
}
TRAIN_TAGS = {"train/grad_norm", "train/loss", "train/lr"}
VAL_TAGS = {"val/auc", "val/loss", "val/n"}
ALL_TAGS = PERF_TAGS | TRAIN_TAGS | VAL_TAGS

STEPS_PER_EPOCH = 6  # 64 images, 4 folds -> 48 training images / batch 8
EPOCHS = 2
LOG_EVERY = 4
# Intervals end where global_step % LOG_EVERY == 0 or an epoch ends: steps 4, 6, 8, 12.
LOG_STEPS = [4, 6, 8, 12]

# Every way Python code reads a tensor's value on the host. On a GPU each one waits for the device
# (a sync); on this CPU-only machine they are counted instead, by where they happen.
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


class HostReads:
    """Counts host reads of tensors by the innermost region they happen in: the training loop
    ("train"), its per-interval logging ("log"), validation ("eval"), the input pipeline ("data":
    host-side tensors of the loader, not device reads on a GPU), or elsewhere ("other")."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        self.counts: collections.Counter = collections.Counter()
        self.log_calls = 0
        self._stack: list[str] = []
        for name in HOST_READS:
            if hasattr(torch.Tensor, name):
                mp.setattr(torch.Tensor, name, self._counting(getattr(torch.Tensor, name), name))
        if hasattr(torch.cuda, "synchronize"):
            mp.setattr(torch.cuda, "synchronize", self._counting(torch.cuda.synchronize, "synchronize"))
        T = train_mod.Trainer
        mp.setattr(T, "_train_epoch", self._region(T._train_epoch, "train"))
        mp.setattr(T, "_log_interval", self._region(T._log_interval, "log", count=True))
        mp.setattr(T, "evaluate", self._region(T.evaluate, "eval"))
        mp.setattr(TorchLoader, "iter_epoch", self._region_gen(TorchLoader.iter_epoch, "data"))

    def _counting(self, fn, name):
        def wrapper(*args, **kwargs):
            self.counts[self._stack[-1] if self._stack else "other"] += 1
            return fn(*args, **kwargs)

        return wrapper

    def _region(self, fn, region, count=False):
        def wrapper(*args, **kwargs):
            if count:
                self.log_calls += 1
            self._stack.append(region)
            try:
                return fn(*args, **kwargs)
            finally:
                self._stack.pop()

        return wrapper

    def _region_gen(self, fn, region):
        def wrapper(*args, **kwargs):
            gen = fn(*args, **kwargs)
            while True:
                self._stack.append(region)
                try:
                    item = next(gen)
                except StopIteration:
                    return
                finally:
                    self._stack.pop()
                yield item

        return wrapper


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("obs")
    threads = torch.get_num_threads()
    # One intra-op thread: two OpenMP threads on two cores shared with other processes slow the
    # step down tenfold (spin-waiting); the figures here do not depend on the thread count.
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            reads = HostReads(mp)
            rc = main(
                [
                    "train",
                    *FAST_TRAIN,
                    f"data.root={tiny_data}",
                    f"output.root={out}",
                    "output.name=run",
                    f"train.epochs={EPOCHS}",
                    f"train.log_every={LOG_EVERY}",
                    "train.mixup_alpha=0.2",  # its host-side randomness must not read the device
                    "profile.enabled=true",
                    "profile.wait=1",
                    "profile.warmup=1",
                    "profile.active=2",
                ]
            )
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return out / "run", reads


def test_tensorboard_has_every_tag(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = run
    ea = EventAccumulator(str(run_dir / "tb"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert ALL_TAGS <= tags, f"missing in TensorBoard: {sorted(ALL_TAGS - tags)}"
    # Logged once per interval at the interval's last step, and validation once per epoch.
    assert [e.step for e in ea.Scalars("train/loss")] == LOG_STEPS
    assert [e.step for e in ea.Scalars("val/auc")] == [STEPS_PER_EPOCH * (e + 1) for e in range(EPOCHS)]
    # The same values as metrics.jsonl (float32 in the event file).
    rows = [r for r in read_metrics(run_dir) if "perf/img_per_s" in r]
    tb = [e.value for e in ea.Scalars("perf/img_per_s")]
    assert tb == pytest.approx([r["perf/img_per_s"] for r in rows], rel=1e-6)


def test_metrics_jsonl_has_the_same_tags_and_sane_values(run):
    run_dir, _ = run
    rows = read_metrics(run_dir)
    tags = set().union(*(r.keys() for r in rows)) - {"step", "epoch"}
    assert ALL_TAGS <= tags, f"missing in metrics.jsonl: {sorted(ALL_TAGS - tags)}"
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == LOG_STEPS
    for r in train_rows:
        assert 0.0 <= r["perf/data_wait_frac"] <= 1.0
        assert r["perf/world_size"] == 1.0
        assert r["perf/img_per_s"] == pytest.approx(r["perf/img_per_s_per_device"] * r["perf/world_size"])
        assert r["perf/step_time_s"] > 0 and r["perf/max_mem_bytes"] > 0
        # Throughput and step time describe the same interval: batch 8 per step.
        assert r["perf/img_per_s_per_device"] == pytest.approx(8 / r["perf/step_time_s"], rel=1e-6)
    val_rows = [r for r in rows if "val/auc" in r]
    assert [r["epoch"] for r in val_rows] == list(range(1, EPOCHS + 1))
    assert all(r["val/n"] == 16 and r["perf/epoch_time_s"] > 0 for r in val_rows)


def test_profiler_trace_is_json_with_the_named_ranges(run):
    run_dir, _ = run
    traces = sorted((run_dir / "profile").glob("*.json"))
    assert len(traces) == 1, traces  # one window, rank 0 only
    assert traces[0].name.startswith("rank0.")
    events = json.loads(traces[0].read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"data", "forward", "backward", "optimizer"} <= names
    # The active window is 2 steps: each range appears twice.
    assert sum(e.get("name") == "forward" and e.get("ph") == "X" for e in events) == 2


def test_logging_every_n_steps_reads_the_device_once_per_interval(run):
    _, reads = run
    # Nothing in the training loop reads a tensor outside the interval's logging: no per-step sync.
    assert reads.counts["train"] == 0, dict(reads.counts)
    # One logging call per interval, each with a fixed small number of reads (one packed tolist()):
    # proportional to steps / log_every, not to steps.
    assert reads.log_calls == len(LOG_STEPS)
    assert 1 <= reads.counts["log"] <= 2 * len(LOG_STEPS), dict(reads.counts)
    assert reads.counts["log"] < EPOCHS * STEPS_PER_EPOCH


def _profile_steps(cfg: ProfileConfig, out, rank: int, steps: int) -> ProfilerWindow:
    with ProfilerWindow(cfg, out, rank) as prof:
        for _ in range(steps):
            with torch.profiler.record_function("forward"):
                torch.ones(4).sum()
            prof.step()
    return prof


def test_profiler_only_on_listed_ranks(tmp_path):
    cfg = ProfileConfig(enabled=True, wait=0, warmup=1, active=1, ranks=[0, 2])
    for rank in (0, 1, 2):
        _profile_steps(cfg, tmp_path / f"r{rank}", rank, steps=3)
    assert [p.name for p in (tmp_path / "r0").iterdir()] == ["rank0.step2.pt.trace.json"]
    assert [p.name for p in (tmp_path / "r2").iterdir()] == ["rank2.step2.pt.trace.json"]
    assert not (tmp_path / "r1").exists()


def test_profiler_writes_a_window_cut_short_by_the_end_of_the_run(tmp_path):
    cfg = ProfileConfig(enabled=True, wait=1, warmup=1, active=10, ranks=[0])
    prof = _profile_steps(cfg, tmp_path, 0, steps=4)  # the run ends 2 steps into the window
    assert len(prof.trace_paths) == 1
    events = json.loads(prof.trace_paths[0].read_text())["traceEvents"]
    assert sum(e.get("name") == "forward" and e.get("ph") == "X" for e in events) == 2

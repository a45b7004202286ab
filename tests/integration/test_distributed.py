"""The three launchers, for real: torchrun on one node, torchrun as two "nodes", accelerate launch,
and launch/train.sh with a SIGTERM in the middle. Every run is a real process tree (gloo on CPU).

What the tests hold the launchers to:

- Two ranks compute what one process computes with the same global batch. Under the settings
  below (``EXACT``) 2 ranks x batch 1 and 1 process x batch 1 x ``train.grad_accum=2`` do the same
  arithmetic: each optimizer step sees the same two images (rank r takes every second image of the
  step's slice of the epoch permutation; the single process takes them as two micro-batches in the
  same order), BatchNorm normalizes each image by itself in both (batch 1 per forward), and the
  gradient is (g0 + g1) / 2 either way. Measured: the learnable weights end bit-identical. The
  tolerance, 1e-5 of the distance the weights moved in training, only allows for a BLAS or gloo
  build that sums in another order; a wrong shard or a gradient that is summed instead of averaged
  moves them by about the whole distance (a control run that took the two images as one batch of 2
  ended 1.45 x that distance away). Why not 2 x 8 against 1 x 16: BatchNorm then normalizes with
  statistics of 8 images on each rank but of 16 in the single process; at identical weights the
  first step's loss already differs by 4 %, and after 6 steps the weights were 1.5 x the training
  distance apart (``train.sync_bn`` would fix that, but SyncBatchNorm needs CUDA). Augmentation is
  made deterministic for the comparison: square images, ``data.scale_min=1.0`` (the crop is the
  whole image whatever the per-rank seed draws) and no flips.
- BatchNorm running statistics are excluded from that comparison: with DDP's buffer broadcast they
  are rank 0's, i.e. of rank 0's images only, which is the documented DDP behaviour.
- The validation loss a 2-rank run logs is the loss of the checkpoint it saved, recomputed in one
  process: each rank scores its own shard of the validation set with its own copy of the model, so
  any difference between the ranks' models (weights or BatchNorm buffers) shows here.
- Two torchrun agents (``--nnodes=2``, c10d rendezvous on 127.0.0.1, via launch/train.sh) and
  ``accelerate launch --config_file launch/accelerate_cpu_2proc.yaml`` end with the weights of the
  standalone 2-rank run. The accelerate run is launched with ``--mixed_precision=bf16`` while the
  project config says ``train.mixed_precision=no``: equal weights show the project's setting wins
  (a 2-rank run with ``train.mixed_precision=bf16`` ended 1.46 x the training distance away).
- SIGTERM to the agent that launch/train.sh started, mid-epoch, with no periodic checkpoints: the
  one checkpoint is the one the signal made, at the step the run stopped; ``resume=auto`` continues
  from it and finishes, logging every step exactly once.

Run: ``.venv/bin/python -m pytest tests/integration/test_distributed.py -q``. About 3.5 min on 2
shared CPU cores, most of it the start of the processes (importing torch). The launch scripts'
argument checks (``--dry-run``, no training) are in tests/integration/test_launch_scripts.py.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from invasive_dist.metrics import read_metrics

from ..conftest import ROOT
from ..procs import clean_env, kill_tree, write_init_weights

TORCHRUN = Path(sys.executable).with_name("torchrun")
ACCELERATE = Path(sys.executable).with_name("accelerate")
TRAIN_SH = ROOT / "launch" / "train.sh"
RUN_TIMEOUT = 420  # s per launch; generous: the machine running the tests may be shared

# 48 labelled 64x64 images: 36 train / 12 validation (fold 0 of 4). 2 epochs of 18 steps of 2 images.
N_TRAIN, N_VAL = 36, 12
EXACT = [
    "model.arch=resnet18",
    "data.image_size=64",  # 2x2 at the last stage: BatchNorm over one image is defined
    "data.batch_size=1",
    "data.n_folds=4",
    "data.hflip=false",
    "data.vflip=false",
    "data.scale_min=1.0",
    "train.epochs=2",
    "train.log_every=6",
    "optim.lr=0.01",
    "output.tensorboard=false",
]
EXACT_STEPS = 2 * N_TRAIN // 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A launcher process in its own session, stdout + stderr to ``log``."""

    def __init__(self, cmd: list, log: Path, env: dict | None = None) -> None:
        self.cmd = [str(c) for c in cmd]
        self.log = log
        with open(log, "a") as f:
            f.write("$ " + " ".join(self.cmd) + "\n")
            f.flush()
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=ROOT,
                env=env or clean_env(),
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill_tree(self) -> None:
        kill_tree(self.proc.pid)
        self.proc.wait()

    def wait(self, timeout: float = RUN_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_tree()
            pytest.fail(
                f"{' '.join(self.cmd[:6])} ... still running after {timeout:.0f} s:\n{self.output[-4000:]}"
            )


def run(cmd: list, log: Path, timeout: float = RUN_TIMEOUT) -> tuple[int, str]:
    p = Proc(cmd, log)
    rc = p.wait(timeout)
    return rc, p.output


def train_args(data: Path, root: Path, name: str, *extra: str) -> list[str]:
    return [
        "-m",
        "invasive_dist",
        "train",
        *EXACT,
        f"data.root={data}",
        f"output.root={root}",
        f"output.name={name}",
        *extra,
    ]


def learnable(state: dict) -> dict:
    """The trained tensors of a model state dict (not BatchNorm's running statistics)."""
    return {k: v for k, v in state.items() if v.is_floating_point() and "running_" not in k}


def flat(tensors: dict):
    import torch

    return torch.cat([tensors[k].double().flatten() for k in sorted(tensors)])


def last_state(run_dir: Path) -> dict:
    from invasive_dist.checkpoint import load_checkpoint

    return load_checkpoint(run_dir / "checkpoints" / "last.pt")


def assert_same_training(run_dir: Path, reference: Path, init: dict, what: str, rtol: float = 1e-5) -> None:
    """``run_dir`` ended where ``reference`` did: distance between the final learnable weights
    at most ``rtol`` x the distance the reference's weights moved from ``init``."""
    a, b = last_state(run_dir), last_state(reference)
    assert a["global_step"] == b["global_step"] == EXACT_STEPS, (a["global_step"], b["global_step"])
    assert a["global_batch"] == b["global_batch"] == 2
    wa, wb, w0 = flat(learnable(a["model"])), flat(learnable(b["model"])), flat(learnable(init))
    moved = float((wb - w0).norm())
    gap = float((wa - wb).norm())
    assert moved > 0.1, f"the reference run barely trained (moved {moved:.3g}); the comparison would be empty"
    assert gap <= rtol * moved, (
        f"{what}: final weights differ from the reference by {gap:.3g}, {gap / moved:.2e} of the "
        f"{moved:.3g} the weights moved in training (allowed {rtol:g})"
    )


# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def square_data(work) -> Path:
    """48 train / 8 test images of 64x64: square, so the training crop can be made deterministic."""
    from invasive_dist.data.synth import synthesize

    out = work / "data"
    synthesize(out, n_train=N_TRAIN + N_VAL, n_test=8, size=(64, 64), seed=0)
    return out


@pytest.fixture(scope="module")
def init_weights(work) -> tuple[Path, dict]:
    """A fixed initial model (model.weights=FILE), so that 'how far training moved' is known."""
    return write_init_weights(work / "init.pt")


@pytest.fixture(scope="module")
def reference(work, square_data, init_weights) -> Path:
    """torchrun --standalone --nproc_per_node=2: the 2-rank run the others are compared with."""
    cmd = [
        TORCHRUN,
        "--standalone",
        "--nproc_per_node=2",
        *train_args(square_data, work, "ddp2", f"model.weights={init_weights[0]}"),
    ]
    rc, out = run(cmd, work / "ddp2.log")
    assert rc == 0, f"torchrun exit code {rc}: a rank failed\n{out[-4000:]}"
    assert "global batch 2 = 1 per device x 2 processes x 1 accumulation" in out, out[-3000:]
    val = [r for r in read_metrics(work / "ddp2") if "val/loss" in r]
    assert [r["epoch"] for r in val] == [1, 2] and all(r["val/n"] == N_VAL for r in val), val
    return work / "ddp2"


# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_ranks_compute_what_one_process_does_with_the_same_global_batch(
    work, square_data, init_weights, reference
):
    cmd = [
        sys.executable,
        *train_args(square_data, work, "one", f"model.weights={init_weights[0]}", "train.grad_accum=2"),
    ]
    rc, out = run(cmd, work / "one.log")
    assert rc == 0, out[-4000:]
    assert "global batch 2 = 1 per device x 1 process x 2 accumulation" in out, out[-3000:]
    assert_same_training(work / "one", reference, init_weights[1], "1 process x 2 accumulation vs 2 ranks")
    # The same images in every step: the logged training losses agree step by step.
    loss = {r["step"]: r["train/loss"] for r in read_metrics(work / "one") if "train/loss" in r}
    ref = {r["step"]: r["train/loss"] for r in read_metrics(reference) if "train/loss" in r}
    assert loss.keys() == ref.keys() and len(loss) == EXACT_STEPS // 6
    np.testing.assert_allclose([loss[s] for s in sorted(loss)], [ref[s] for s in sorted(ref)], rtol=1e-5)


@pytest.mark.slow
def test_val_loss_a_two_rank_run_logs_is_that_of_the_checkpoint_it_saved(reference):
    """Rank r scores shard r of the validation set with its own copy of the model. Recomputed in
    this process from checkpoints/last.pt (rank 0's state), the loss must match what the run logged
    after its last epoch, shard by shard: otherwise the ranks held different models (weights or
    BatchNorm buffers) and the logged val/auc -- which picks best.pt -- is not the saved model's."""
    import torch

    from invasive_dist.config import load_config
    from invasive_dist.data import LoaderSpec, Shard, build_loader
    from invasive_dist.data.base import eval_plan
    from invasive_dist.data.kaggle import split, train_index
    from invasive_dist.predict import load_model_for_inference

    cfg = load_config(reference / "config.yaml", ["resume=''"])
    full = train_index(cfg.data.root, cfg.data.labels_csv, cfg.data.limit)
    _, val = split(full, cfg.data.n_folds, cfg.data.fold, cfg.seed)
    assert len(val) == N_VAL
    loader = build_loader(LoaderSpec.of(val, cfg.data, Shard(0, 1), "cpu", False, cfg.seed), cfg.data)
    model = load_model_for_inference(cfg, reference, "last")
    idx, logits, labels = [], [], []
    with torch.no_grad():
        for batch in loader.iter_epoch(0):
            idx.append(batch.index)
            logits.append(model(batch.images).float().squeeze(1))
            labels.append(batch.labels)
    order = torch.cat(idx).numpy()
    z = torch.cat(logits).double().numpy()[np.argsort(order)]
    y = torch.cat(labels).double().numpy()[np.argsort(order)]
    per_image = np.logaddexp(0, z) - y * z
    expected = float(per_image.mean())
    logged = [r["val/loss"] for r in read_metrics(reference) if "val/loss" in r][-1]
    if abs(logged - expected) > 1e-5 * max(1.0, abs(expected)):
        shards = [eval_plan(N_VAL, N_VAL, Shard(r, 2))[0] for r in range(2)]
        mine = [float(per_image[s].mean()) for s in shards]
        rank1_logged = (logged * N_VAL - mine[0] * len(shards[0])) / len(shards[1])
        pytest.fail(
            f"the 2-rank run logged val/loss {logged:.6f}, but its checkpoint scores {expected:.6f}. "
            f"Per shard, the checkpoint gives {mine[0]:.6f} (rank 0's images) and {mine[1]:.6f} "
            f"(rank 1's); if rank 0 matched, rank 1 scored {rank1_logged:.6f} with a model that "
            "differs from the checkpoint (e.g. rank-local BatchNorm running statistics: DDP broadcasts "
            "rank 0's buffers at each training forward, then every rank updates its own)"
        )


@pytest.mark.slow
def test_two_torchrun_agents_as_two_nodes_train_like_one_node(work, square_data, init_weights, reference):
    """launch/train.sh --nnodes 2 on one machine: two agents, c10d rendezvous on 127.0.0.1."""
    port = free_port()
    env = {**clean_env(), "RDZV_ID": f"test-two-nodes-{port}"}
    # launch/train.sh adds `-m invasive_dist train --config CONFIG`; the overrides follow.
    args = train_args(square_data, work, "nodes2", f"model.weights={init_weights[0]}")[3:]
    config = work / "empty.yaml"
    config.write_text("{}\n")
    agents = [
        Proc(
            [
                TRAIN_SH,
                "--nnodes",
                "2",
                "--node-rank",
                str(r),
                "--master",
                f"127.0.0.1:{port}",
                "-n",
                "1",
                config,
                *args,
            ],
            work / f"nodes2-agent{r}.log",
            env,
        )
        for r in (0, 1)
    ]
    rcs = [a.wait() for a in agents]
    logs = "\n".join(a.output[-3000:] for a in agents)
    assert rcs == [0, 0], f"agent exit codes {rcs}\n{logs}"
    for r, a in enumerate(agents):
        assert f"--nnodes=2 --node_rank={r} --nproc_per_node=1 --rdzv_backend=c10d" in a.output, a.output[
            :2000
        ]
    assert "global batch 2 = 1 per device x 2 processes x 1 accumulation" in logs, logs
    assert_same_training(work / "nodes2", reference, init_weights[1], "2 nodes x 1 vs 1 node x 2")


@pytest.mark.slow
def test_accelerate_launch_trains_two_processes_and_our_precision_wins(
    work, square_data, init_weights, reference
):
    cmd = [
        ACCELERATE,
        "launch",
        "--config_file",
        ROOT / "launch" / "accelerate_cpu_2proc.yaml",
        "--main_process_port",
        str(free_port()),
        "--mixed_precision",
        "bf16",
        *train_args(square_data, work, "accel", f"model.weights={init_weights[0]}"),
    ]
    rc, out = run(cmd, work / "accel.log")
    assert rc == 0, out[-4000:]
    assert "global batch 2 = 1 per device x 2 processes x 1 accumulation" in out, out[-3000:]
    assert "precision no" in out  # the default train.mixed_precision (the override `=no` reads as false)
    # bf16 autocast would change every product; equal weights mean it was not applied.
    assert_same_training(work / "accel", reference, init_weights[1], "accelerate launch vs torchrun")


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_that_step_and_resume_auto_finishes(work, square_data):
    """2 ranks x batch 2: 9 steps per epoch, 2 epochs; no periodic checkpoints, so the only
    checkpoint of epoch 1 is the one the signal makes."""
    name = "sig"
    run_dir = work / name
    config = work / "sig.yaml"
    config.write_text("{}\n")
    settings = [
        *EXACT,
        "data.batch_size=2",
        "train.log_every=1",
        "checkpoint.every_steps=0",
        f"data.root={square_data}",
        f"output.root={work}",
        f"output.name={name}",
    ]
    steps_per_epoch, total = N_TRAIN // 4, 2 * (N_TRAIN // 4)
    p = Proc([TRAIN_SH, "-n", "2", config, *settings], work / "sig.log")
    deadline = time.monotonic() + RUN_TIMEOUT
    while not any(r.get("step", 0) >= 2 and "train/loss" in r for r in read_metrics(run_dir)):
        if p.proc.poll() is not None:
            pytest.fail(f"the run ended (rc {p.proc.returncode}) before step 2:\n{p.output[-4000:]}")
        if time.monotonic() > deadline:
            p.kill_tree()
            pytest.fail(f"no step 2 after {RUN_TIMEOUT} s:\n{p.output[-4000:]}")
        time.sleep(0.05)
    # launch/train.sh exec'd torchrun: this pid is the agent's, as Slurm or a user's kill finds it.
    os.kill(p.proc.pid, signal.SIGTERM)
    rc = p.wait()
    out = p.output
    # torchrun re-raises the signal as an error once its workers ended (its own exit code 1, with a
    # traceback); launch/agent.py turns that into 128 + SIGTERM and one line. Each worker exits 143
    # (errors.EXIT_PREEMPTED).
    assert rc == 143, f"launch exit code {rc}\n{out[-4000:]}"
    assert "launch: torchrun got SIGTERM" in out and "Traceback" not in out, out[-4000:]
    m = re.search(r"SIGTERM received: saved at step (\d+), exiting", out)
    assert m, f"no 'saved at step N' line:\n{out[-4000:]}"
    stopped = int(m.group(1))
    assert 2 <= stopped < total, stopped
    assert "failed (exitcode" not in out, f"a worker failed instead of stopping:\n{out[-4000:]}"
    # The position the trainer keeps: a stop after an epoch's last step is saved before that
    # epoch's validation, as (epoch, steps_per_epoch).
    epoch, in_epoch = divmod(stopped - 1, steps_per_epoch)
    in_epoch += 1
    state = last_state(run_dir)
    assert state["global_step"] == stopped
    assert (state["epoch"], state["step_in_epoch"]) == (epoch, in_epoch)
    assert (run_dir / "checkpoints" / f"step-{stopped:08d}.pt").is_file()

    rc, out = run([TRAIN_SH, "-n", "2", config, *settings, "resume=auto"], work / "sig-resume.log")
    assert rc == 0, out[-4000:]
    assert f"resumed from {run_dir}/checkpoints/last.pt at epoch {epoch} step {stopped}" in out, out[-4000:]
    state = last_state(run_dir)
    assert state["global_step"] == total and (state["epoch"], state["step_in_epoch"]) == (2, 0)
    steps = [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert steps == list(range(1, total + 1)), f"each step logged once, in order: {steps}"
    assert (run_dir / "checkpoints" / "best.pt").is_file()

"""The training recipe's parts that decide model quality: the EMA (warm-up, BatchNorm statistics,
resume) and the random streams (per-rank, exact restore, the fold seed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from invasive_dist.optim import EMA


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def float_state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items() if v.is_floating_point()}


def test_ema_warms_up_as_the_mean_and_averages_batchnorm_statistics():
    """After 3 updates with decay 0.99 the EMA is the mean of the 3 post-step states, running
    statistics included: not ~the initial weights (no warm-up), and not the live model's running
    statistics (copied onto averaged weights before)."""
    model = bn_net()
    ema = EMA(model, decay=0.99)
    snapshots = []
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0 + step)
            model[1].running_mean.fill_(10.0 * (step + 1))
            model[1].num_batches_tracked.add_(1)
        snapshots.append(float_state(model))
        ema.update(model)
    got = ema.module.state_dict()
    for k in snapshots[0]:
        mean = torch.stack([s[k] for s in snapshots]).mean(0)
        torch.testing.assert_close(got[k], mean, msg=f"{k} is not the mean of the 3 states")
    assert got["1.running_mean"].eq(20.0).all()  # (10 + 20 + 30) / 3; the live model holds 30
    assert got["1.num_batches_tracked"].item() == 3  # counters are copied, not averaged


def test_ema_reaches_its_nominal_decay_after_its_window():
    ema = EMA(bn_net(), decay=0.995)
    ema.updates = 0
    assert ema.current_decay() == 0.0  # the first update copies the model
    ema.updates = 199
    assert ema.current_decay() == 0.995  # window 1 / (1 - 0.995) = 200 steps: the EMA from here on
    ema.updates = 100
    assert ema.current_decay() == 100 / 101


def make_trainer(tiny_data, tmp_path, *extra: str):
    from accelerate import Accelerator

    from invasive_dist.config import load_config
    from invasive_dist.distributed import WorldInfo
    from invasive_dist.train import Trainer, build_parts

    from ..conftest import FAST_TRAIN

    over = [*FAST_TRAIN, f"data.root={tiny_data}", f"output.root={tmp_path}", "output.tensorboard=false"]
    cfg = load_config(None, [*over, *extra])
    acc, world = Accelerator(cpu=True), WorldInfo()
    return Trainer(cfg, acc, world, build_parts(cfg, acc, world))


def test_ema_switched_on_at_resume_starts_from_the_resumed_weights(tiny_data, tmp_path):
    """A run trained without EMA, resumed with train.ema_decay: the EMA holds the checkpoint's
    weights, not the new run's initial ones; with EMA on both sides its update count carries over."""
    plain = make_trainer(tiny_data, tmp_path)
    with torch.no_grad():
        for p in plain.raw_model.parameters():
            p.add_(0.5)  # "trained" weights, unlike any fresh build
    state = plain.state_dict()
    assert state["ema"] is None
    with_ema = make_trainer(tiny_data, tmp_path, "train.ema_decay=0.9")
    with_ema.load_state_dict(state)
    ema = with_ema.ema.module.state_dict()
    for k, v in state["model"].items():
        assert torch.equal(ema[k], v), f"ema.{k} is not the resumed weight"
    assert with_ema.ema.updates == 0

    with_ema.ema.updates = 37
    again = make_trainer(tiny_data, tmp_path, "train.ema_decay=0.9")
    again.load_state_dict(with_ema.state_dict())
    assert again.ema.updates == 37


def test_rng_state_restores_numpy_and_python_streams_mid_block():
    """Restored mid-stream (NumPy's position and cached Gaussian, Python's cached gauss), the draws
    continue exactly; NumPy's position was dropped, so its draws restarted a 624-word block."""
    import random

    import numpy as np

    from invasive_dist.train import rng_state, set_rng_state

    np.random.seed(3)
    random.seed(3)
    np.random.rand(5), np.random.standard_normal(), random.gauss(0, 1)  # mid-block, a Gaussian cached
    saved = rng_state()

    def draws():
        return (np.random.rand(3).tolist(), np.random.standard_normal(), random.gauss(0, 1), random.random())

    expected = draws()
    np.random.seed(99), random.seed(99)
    set_rng_state(saved)
    assert draws() == expected


def test_fold_seed_keeps_the_folds_when_seed_changes(tiny_data, tmp_path):
    """A seed ensemble over the same folds: seed=1 with data.fold_seed=0 validates on seed=0's fold."""
    from accelerate import Accelerator

    from invasive_dist.build import build_data, resolve_batch
    from invasive_dist.config import load_config

    from ..conftest import FAST_TRAIN

    acc = Accelerator(cpu=True)

    def val_names(*extra):
        cfg = load_config(None, [*FAST_TRAIN, f"data.root={tiny_data}", f"output.root={tmp_path}", *extra])
        return build_data(cfg, acc, resolve_batch(cfg, 1), train=False, val=False).val_idx.names

    assert val_names("seed=1") != val_names("seed=0")  # null fold_seed: `seed` sets the folds, as before
    assert val_names("seed=1", "data.fold_seed=0") == val_names("seed=0")


def test_ranks_train_with_their_own_random_streams_from_the_same_weights(tiny_data, tmp_path):
    """After build_parts, torch's RNG is this rank's stream (rank 0's here), not the build seed's,
    which every rank shared (identical dropout masks on every GPU); the weights still come from `seed`."""
    from invasive_dist.models import build_model
    from invasive_dist.train import seed_rank

    trainer = make_trainer(tiny_data, tmp_path)
    after_build = torch.rand(8)
    seed_rank(trainer.cfg.seed, 0)
    assert torch.equal(after_build, torch.rand(8))
    seed_rank(trainer.cfg.seed, 1)
    assert not torch.equal(after_build, torch.rand(8))
    torch.manual_seed(trainer.cfg.seed)
    reference = build_model(trainer.cfg.model).state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in trainer.raw_model.state_dict().items())


@pytest.fixture
def fp16_cpu(monkeypatch):
    """An Accelerator in fp16 on CPU, standing in for a GPU's: Accelerate makes no GradScaler on CPU
    (and `train` refuses fp16 there), so the test gives it torch's CPU GradScaler and fp16 autocast
    to run the Trainer's fp16 path. Accelerate's state is process-wide: reset before and after."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import GradScalerKwargs

    def make(init_scale: float = 2.0**16):
        AcceleratorState._reset_state(True)
        acc = Accelerator(
            cpu=True, mixed_precision="fp16", kwargs_handlers=[GradScalerKwargs(init_scale=init_scale)]
        )
        acc.native_amp = True
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        return acc

    yield make
    AcceleratorState._reset_state(True)


# Smaller than FAST_TRAIN's 64 px (fp16 on CPU is slow), 4 steps, a log interval of 2 steps.
FP16_SHORT = ["data.image_size=32", "train.max_steps=4", "train.log_every=2", "train.epochs=1"]


def fp16_trainer(acc, tiny_data, tmp_path, name, *extra):
    from invasive_dist.config import load_config
    from invasive_dist.distributed import WorldInfo
    from invasive_dist.train import Trainer, build_parts

    from ..conftest import FAST_TRAIN

    over = [*FAST_TRAIN, f"data.root={tiny_data}", f"output.root={tmp_path}", f"output.name={name}"]
    cfg = load_config(None, [*over, "output.tensorboard=false", *FP16_SHORT, *extra])
    world = WorldInfo()
    return Trainer(cfg, acc, world, build_parts(cfg, acc, world))


@pytest.mark.slow  # fp16 on CPU is slow: ~3 min each on a loaded 2-core machine
def test_fp16_counts_overflow_steps_and_logs_a_finite_grad_norm(fp16_cpu, tiny_data, tmp_path, monkeypatch):
    """A NaN loss at step 2 under fp16: the GradScaler skips it; the step is counted
    (train/nonfinite_steps), left out of train/grad_norm (Infinity was logged), and with
    nonfinite=stop the run goes on: one overflow is routine for fp16, not a fault."""
    from invasive_dist.metrics import read_metrics

    monkeypatch.setenv("INVASIVE_DIST_FAULT", "nan@2")
    trainer = fp16_trainer(fp16_cpu(), tiny_data, tmp_path, "fp16", "train.nonfinite=stop")
    trainer.fit()
    rows = [r for r in read_metrics(tmp_path / "fp16") if "train/loss" in r]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(np.isfinite(r["train/grad_norm"]) for r in rows), rows
    assert rows[0]["train/nonfinite_steps"] >= 1
    skipped = trainer.nonfinite_steps
    assert rows[-1]["train/loss_scale"] == 2.0**16 / 2**skipped  # each skip halved the scale once


@pytest.mark.slow  # fp16 on CPU is slow: ~3 min each on a loaded 2-core machine
def test_fp16_stop_ends_a_run_whose_loss_scale_collapses(fp16_cpu, tiny_data, tmp_path, monkeypatch):
    """NaN losses that keep the scale falling: with nonfinite=stop the run stops with a message
    naming the loss scale (before, nonfinite=stop did nothing under fp16); with skip it goes on."""
    from invasive_dist.train import NonFiniteError

    monkeypatch.setenv("INVASIVE_DIST_FAULT", "nan@1,nan@2")
    trainer = fp16_trainer(fp16_cpu(init_scale=2.0), tiny_data, tmp_path, "stop", "train.nonfinite=stop")
    with pytest.raises(NonFiniteError, match="fp16 loss scale fell to 0.5"):
        trainer.fit()
    trainer = fp16_trainer(fp16_cpu(init_scale=2.0), tiny_data, tmp_path, "skip", "train.nonfinite=skip")
    assert trainer.fit().global_step == 4


def test_fp16_loss_scale_does_not_carry_to_the_next_trainer(fp16_cpu, tiny_data, tmp_path):
    """cv trains every fold with one Accelerator: each fold's Trainer starts at the initial scale."""
    acc = fp16_cpu()
    first = fp16_trainer(acc, tiny_data, tmp_path, "fold0")
    first.scaler.load_state_dict({**first.scaler.state_dict(), "scale": 0.25})  # where fold 0 left it
    second = fp16_trainer(acc, tiny_data, tmp_path, "fold1", "data.fold=1")
    assert second.state_dict()["scaler"]["scale"] == 2.0**16

"""The real ``Trainer.train_step`` and one evaluation batch with every tensor on the CUDA stand-in
(``standin.py``): ResNet-50 at batch 256, bf16 autocast, channels_last, the fused optimizers as
``optim.build_optimizer`` configures them, EMA, mixup/cutmix, clipping; [600, 800] inputs and
Inception-v3 with its auxiliary heads. The stand-in raises on a tensor on another device, a host
sync in the step, a fused-optimizer argument the CUDA kernel would refuse; the planted-defect tests
at the end prove that it does."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch

from invasive_dist import evaluation
from invasive_dist import train as train_mod
from invasive_dist.data.base import Batch

from .conftest import build_trainer, config, device_batches
from .standin import FusedArgError, HostSync, WrongDevice, WrongDtype

# The full recipe around the step: EMA, mixup and cutmix (each batch picks one), clipping, AdamW.
RECIPE = [
    "optim.name=adamw",
    "train.ema_decay=0.999",
    "train.mixup_alpha=0.2",
    "train.cutmix_alpha=1.0",
    "train.clip_grad_norm=1.0",
]


def run_steps(s, trainer, steps: int = 1):
    next_batch = device_batches(s, trainer)
    with s.hot_loop("Trainer.train_step"):
        for _ in range(steps):
            out = trainer.train_step(next_batch)
    return out, next_batch


def assert_trained_on_device(s, trainer, out, fused: str) -> None:
    """What a step must leave behind on a GPU: its outputs, parameters, optimizer state and EMA on
    the device, the forward in the run's precision, the fused kernel called (and checked)."""
    for t in out:  # (mean loss, gradient norm, non-finite flag): device scalars, read once per interval
        assert (t.device, t.dtype, t.dim()) == (s.device, torch.float32, 0)
    assert any(fused in c for c in s.checks.fused_calls), s.checks.fused_calls
    convs = {dtype for (op, dtype), n in s.checks.seen.items() if op == "aten.convolution"}
    want = torch.bfloat16 if trainer.cfg.train.mixed_precision == "bf16" else torch.float32
    assert convs == {want}, f"convolutions ran in {convs}, not {want} (autocast)"
    for p in trainer.raw_model.parameters():
        assert p.device == s.device and p.dtype == torch.float32
        if p.dim() == 4 and trainer.channels_last:
            assert p.is_contiguous(memory_format=torch.channels_last)
        for v in trainer.inner_optimizer.state[p].values():
            if torch.is_tensor(v):
                assert v.device == s.device, f"optimizer state on {v.device}"
    if trainer.ema:
        assert all(t.device == s.device for t in trainer.ema.module.state_dict().values())


class OneBatch:
    """An evaluation loader of one device batch (the Trainer's val_loader contract)."""

    steps_per_epoch = 1

    def __init__(self, batch: Batch) -> None:
        self.batch = batch

    def iter_epoch(self, epoch: int, start_step: int = 0):
        yield self.batch


def evaluate_one_batch(s, trainer):
    """``Trainer.evaluate`` (the EMA model when on) over one batch: ``evaluation.score``'s batch
    loop runs as it is; the gather of predictions across ranks, which reads them on the host once
    at the end, is where the check stops (it receives what the loop made)."""
    b = 2 * trainer.plan.per_device  # data.eval_batch_size=0: twice the training batch
    trainer.val_loader = OneBatch(device_batches(s, trainer, b)())
    got = {}

    def gather(acc, index, logits, labels):
        got.update(index=index, logits=logits, labels=labels)
        return evaluation.EvalResult(np.arange(1), np.zeros(1), np.zeros(1))

    with mock.patch.object(evaluation, "gather_unique", gather), s.hot_loop("evaluation.score"):
        trainer.evaluate()
    assert got["logits"].shape == (b,) and got["logits"].dtype == torch.float32
    assert all(t.device == s.device for t in got.values())


def test_resnet50_adamw_recipe(standin, tiny_data, tmp_path):
    """configs/bench_r50.yaml (ResNet-50, batch 256, 224 px, bf16, channels_last) with AdamW, EMA,
    mixup/cutmix and clipping: one step, then one evaluation batch of the EMA model."""
    trainer = build_trainer(standin, config(tiny_data, tmp_path, *RECIPE))
    assert (trainer.plan.per_device, trainer.channels_last, trainer.mixer is not None) == (256, True, True)
    out, _ = run_steps(standin, trainer)
    assert_trained_on_device(standin, trainer, out, "_fused_adamw_")
    evaluate_one_batch(standin, trainer)


def test_sgd_grad_accum(standin, tiny_data, tmp_path):
    """Fused SGD with momentum and Nesterov as configured for CUDA, two micro-batches per step (the
    first under ``no_sync``), the measuring path of the gradient norm (no clipping). ResNet-18 keeps
    it quick; the ResNet-50 SGD step is in the slow set."""
    cfg = config(tiny_data, tmp_path, "model.arch=resnet18", "train.grad_accum=2")
    trainer = build_trainer(standin, cfg)
    assert (trainer.plan.accum, cfg.optim.name, cfg.optim.nesterov) == (2, "sgd", True)
    out, batches = run_steps(standin, trainer)
    assert len(batches.made) == 2
    assert_trained_on_device(standin, trainer, out, "_fused_sgd_")


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(["optim.name=sgd"], id="resnet50-sgd"),
        pytest.param([*RECIPE, "data.image_size=[600,800]"], id="resnet50-600x800"),
        pytest.param(
            [*RECIPE, "model.arch=inception_v3", "model.aux_loss_weight=0.4", "data.image_size=299"],
            id="inception_v3-aux",
        ),
    ],
)
def test_recipes(standin, tiny_data, tmp_path, overrides):
    trainer = build_trainer(standin, config(tiny_data, tmp_path, *overrides))
    out, _ = run_steps(standin, trainer)
    fused = "_fused_sgd_" if "optim.name=sgd" in overrides else "_fused_adamw_"
    assert_trained_on_device(standin, trainer, out, fused)
    if "model.aux_loss_weight=0.4" in overrides:  # the aux head trained: its head has a gradient state
        assert all(trainer.inner_optimizer.state[p] for p in trainer.raw_model.AuxLogits.parameters())
    evaluate_one_batch(standin, trainer)


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_mixer_on_device(standin, mode):
    """Each of the Mixer's two paths on a device batch of 256 (the recipe picks one per batch)."""
    mixer = train_mod.Mixer(0.2 if mode == "mixup" else 0.0, 1.0 if mode == "cutmix" else 0.0, 1.0, 0, 0)
    images = torch.empty((256, 3, 224, 224), device=standin.device, memory_format=torch.channels_last)
    target = torch.empty(256, device=standin.device)
    with standin.hot_loop(f"Mixer ({mode})"):
        out, t = mixer(images, target, 7)
    assert (out.device, out.dtype, out.shape) == (standin.device, torch.float32, images.shape)
    assert (t.device, t.dtype, t.shape) == (standin.device, torch.float32, target.shape)
    ops = {op for op, _ in standin.checks.seen}
    assert ("aten.index_put_" in ops or "aten.copy_" in ops) if mode == "cutmix" else "aten.mul" in ops


# ----------------------------------------------------------------------------------------------
# The lane fails where a GPU would: planted defects.


@pytest.fixture
def small_trainer(standin, tiny_data, tmp_path):
    """ResNet-18 with the recipe (AdamW, EMA, mixup/cutmix, clipping), batch 256, bf16, channels_last."""
    return build_trainer(standin, config(tiny_data, tmp_path, "model.arch=resnet18", *RECIPE))


def planted_loss(extra):
    """``binary_loss`` with ``extra(loss)`` planted after it, as a debugging line in the step would be."""
    real = train_mod.binary_loss

    def loss(*args, **kwargs):
        out = real(*args, **kwargs)
        return extra(out)

    return mock.patch.object(train_mod, "binary_loss", loss)


@pytest.mark.parametrize(
    "plant",
    [
        pytest.param(lambda loss: loss + 0 * loss.item(), id="item"),
        pytest.param(lambda loss: loss + 0 * loss.reshape(1).tolist()[0], id="tolist"),
        pytest.param(lambda loss: loss * 2 if loss > 10 else loss, id="if-tensor"),
        pytest.param(lambda loss: loss + 0 * (loss.reshape(1) > 0).nonzero().numel(), id="nonzero"),
        pytest.param(lambda loss: loss + 0 * float(loss.cpu()), id="cpu"),
    ],
)
def test_planted_host_sync_fails(standin, small_trainer, plant):
    with planted_loss(plant), pytest.raises(HostSync, match="Trainer.train_step"):
        run_steps(standin, small_trainer)


def test_planted_cpu_loss_weight_fails(standin, small_trainer):
    """A per-class loss weight made on the host (a 1-element tensor, not a Python scalar)."""
    weight = torch.tensor([2.0])
    with planted_loss(lambda loss: loss * weight), pytest.raises(WrongDevice, match="cpu"):
        run_steps(standin, small_trainer)


def test_planted_float64_fails(standin, small_trainer):
    """A float64 value in the graph (e.g. ``torch.tensor(np.float64)``): slow on GPUs, caught at backward."""
    with planted_loss(lambda loss: loss * torch.ones((), dtype=torch.float64, device=loss.device)):
        with pytest.raises(WrongDtype, match="float64"):
            run_steps(standin, small_trainer)


def test_planted_dtype_mismatch_fails(standin, small_trainer):
    """A mixing step outside autocast that mixes the float32 targets with a bf16 mixing matrix:
    the CUDA matmul refuses the pair, and so does the stand-in."""
    b = small_trainer.plan.per_device
    mix = torch.empty((b, b), dtype=torch.bfloat16, device=standin.device)
    small_trainer.mixer = lambda images, target, step: (images, torch.mm(mix, target[:, None]).squeeze(1))
    with pytest.raises(WrongDtype, match="aten.mm"):
        run_steps(standin, small_trainer)


def test_planted_host_found_inf_fails(standin, small_trainer):
    """A gradient norm returned on the host makes the non-finite flag a host tensor, which torch's
    fused AdamW copies to the device from pageable memory at every step."""
    acc = small_trainer.acc
    real = acc.clip_grad_norm_

    def clip_on_host(params, max_norm):
        real(params, max_norm)
        return torch.zeros(())  # a norm "computed on the host"

    with mock.patch.object(acc, "clip_grad_norm_", clip_on_host), pytest.raises(HostSync, match="pageable"):
        run_steps(standin, small_trainer)


@pytest.mark.parametrize(
    "plant",
    [
        pytest.param(lambda a: a.update(found_inf=a["found_inf"].double()), id="found_inf-float64"),
        pytest.param(lambda a: a.update(found_inf=torch.zeros(())), id="found_inf-on-host"),
        pytest.param(lambda a: a.update(state_steps=[s.cpu() for s in a["state_steps"]]), id="steps-on-host"),
        pytest.param(lambda a: a.update(grads=[g.contiguous() for g in a["grads"]]), id="grad-strides"),
        pytest.param(lambda a: a.update(exp_avgs=[e.half() for e in a["exp_avgs"]]), id="state-dtype"),
    ],
)
def test_fused_kernel_arguments_checked(standin, plant):
    """What the CUDA fused AdamW kernel would refuse or misread, handed to it directly."""
    p = torch.empty((8, 4, 3, 3), device=standin.device).contiguous(memory_format=torch.channels_last)
    args = {
        "grads": [torch.empty_like(p)],
        "exp_avgs": [torch.empty_like(p)],
        "exp_avg_sqs": [torch.empty_like(p)],
        "state_steps": [torch.zeros((), device=standin.device)],
        "found_inf": torch.zeros((), device=standin.device),
    }
    plant(args)
    with pytest.raises(FusedArgError):
        torch._fused_adamw_(
            [p], args["grads"], args["exp_avgs"], args["exp_avg_sqs"], [], args["state_steps"],
            lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False,
            found_inf=args["found_inf"],
        )  # fmt: skip


def test_planted_fused_state_layout_fails(standin, small_trainer):
    """An optimizer state of another memory format than its parameter (channels_last weights with
    a contiguous exp_avg): the fused kernel's same-strides rule."""
    run_steps(standin, small_trainer)  # creates the state
    opt = small_trainer.inner_optimizer
    p = next(p for p in small_trainer.raw_model.parameters() if p.dim() == 4)
    opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"].contiguous()
    with pytest.raises(FusedArgError, match="strides"):
        run_steps(standin, small_trainer)

"""Optimization: optimizer, learning-rate schedule and weight EMA, built together for one run.

    opt = build_optimization(model, cfg.optim, cfg.train, plan, steps_per_epoch)
    opt.optimizer, opt.scheduler, opt.ema, opt.peak_lr

The schedule counts optimizer steps: linear warmup over ``optim.warmup_epochs`` x steps per epoch,
then cosine decay to ``min_lr_ratio`` x peak at ``train.epochs`` x steps per epoch. With
``optim.lr_scaling=linear`` the peak lr is lr x global_batch / base_batch (e.g. 0.1 x 512 / 256 =
0.2). Steps per epoch depend only on (training images, global batch), so the schedule is the same
whatever the number of processes that share the global batch (elastic resume relies on it).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import OptimConfig, TrainConfig
from .models import head_names


def lr_lambda_factory(warmup_steps: int, total_steps: int, min_ratio: float):
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def param_groups(model: nn.Module, o: OptimConfig, lr: float) -> list[dict]:
    """No weight decay on norms and biases; ``backbone_lr_mult`` for everything but the one-logit
    head(s) (the main head and any kept auxiliary heads' last layers)."""
    heads = tuple(n + "." for n in head_names(model))
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (name.startswith(heads), p.ndim > 1)
        groups.setdefault(key, []).append(p)
    out = []
    for (is_head, decay), params in sorted(groups.items()):
        mult = 1.0 if is_head else o.backbone_lr_mult
        out.append({"params": params, "lr": lr * mult, "weight_decay": o.weight_decay if decay else 0.0})
    return out


def build_optimizer(model: nn.Module, o: OptimConfig, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model, o, lr)
    if o.name == "sgd":
        opt = torch.optim.SGD(
            groups, lr=lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0, fused=True
        )
        # Fused SGD skips its update when found_inf is set, but would create the momentum buffer
        # from uninitialised memory on a skipped first step: create the buffers up front.
        if o.momentum > 0:
            for g in opt.param_groups:
                for p in g["params"]:
                    opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
        return opt
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas), fused=True)


class EMA:
    """Exponential moving average of the weights and of the BatchNorm running statistics, on the
    device. ``update(model)`` after each optimizer step; ``module`` is the averaged model.

    Buffers are averaged too, as timm's ModelEmaV3 and ``swa_utils.AveragedModel(use_buffers=True)``
    do: running statistics copied from the live model would describe other weights than the
    averaged ones. Integer buffers (``num_batches_tracked``) are copied.

    Decay warm-up: the update that follows n earlier ones uses min(decay, n / (n + 1)). The first
    copies the model; then the average is the plain mean of the weights after each step so far
    (the running mean swa_utils' SWA computes) until that span reaches the EMA's own window,
    1 / (1 - decay) steps (200 for 0.995), and from there on it is the EMA. So an early
    validation never scores mostly initial weights, and the recipes' window arithmetic holds from
    that step on. (TensorFlow's ``num_updates`` rule, min(decay, (1 + n) / (10 + n)), would keep
    0.995 below its nominal value for 1,790 steps, past the 870 of the ResNet-50 recipe.)

    Not ``AveragedModel.update_parameters`` itself: it reads its update count on the host
    (``bool(n_averaged == 0)``) and copies it to the device at every update, a device sync per
    optimizer step on CUDA. Here the count is a host int and an update is one ``_foreach_lerp_``
    over the floating tensors and one ``_foreach_copy_`` over the integer buffers."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0  # updates applied; 0: the next one copies the model
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._pairs: tuple | None = None  # (model, ema floats, model floats, ema ints, model ints)

    def _tensors(self, model: nn.Module) -> tuple:
        if self._pairs is None or self._pairs[0] is not model:
            ema = [*self.module.parameters(), *self.module.buffers()]
            src = [t.detach() for t in (*model.parameters(), *model.buffers())]
            if len(ema) != len(src):
                raise RuntimeError(f"EMA of {len(ema)} tensors updated from a model with {len(src)}")
            floats = [i for i, t in enumerate(ema) if t.is_floating_point()]
            ints = [i for i, t in enumerate(ema) if not t.is_floating_point()]
            self._pairs = (
                model,
                [ema[i] for i in floats],
                [src[i] for i in floats],
                [ema[i] for i in ints],
                [src[i] for i in ints],
            )
        return self._pairs[1:]

    def current_decay(self) -> float:
        """The decay the next update uses (see the class docstring)."""
        n = self.updates
        return min(self.decay, n / (n + 1))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_f, model_f, ema_i, model_i = self._tensors(model)
        torch._foreach_lerp_(ema_f, model_f, 1.0 - self.current_decay())
        if ema_i:
            torch._foreach_copy_(ema_i, model_i)
        self.updates += 1

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Start over from ``model``'s weights (EMA switched on when resuming a run without one)."""
        self.module.load_state_dict(model.state_dict())
        self.updates = 0

    def state_dict(self) -> dict:
        return self.module.state_dict()  # a plain model state dict: predict loads it into a model

    def load_state_dict(self, state: dict, updates: int) -> None:
        self.module.load_state_dict(state)
        self.updates = updates


@dataclass
class Optimization:
    optimizer: torch.optim.Optimizer  # not yet prepared by Accelerate
    scheduler: torch.optim.lr_scheduler.LambdaLR  # stepped by the Trainer once per optimizer step
    ema: EMA | None  # None when train.ema_decay == 0
    peak_lr: float  # after lr_scaling


def peak_lr(o: OptimConfig, global_batch: int) -> float:
    return o.lr * (global_batch / o.base_batch if o.lr_scaling == "linear" else 1.0)


def build_optimization(
    model: nn.Module, o: OptimConfig, t: TrainConfig, global_batch: int, steps_per_epoch: int
) -> Optimization:
    """Optimizer with its param groups, the warmup + cosine schedule, and the EMA (if on)."""
    lr = peak_lr(o, global_batch)
    ema = EMA(model, t.ema_decay) if t.ema_decay > 0 else None
    optimizer = build_optimizer(model, o, lr)
    total = t.epochs * steps_per_epoch
    warmup = int(round(o.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_factory(warmup, total, o.min_lr_ratio))
    return Optimization(optimizer, scheduler, ema, lr)

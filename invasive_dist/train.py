"""The Trainer: one loop, readable top to bottom.

    trainer = Trainer(cfg, accelerator, world)
    result = trainer.fit()        # train + validate each epoch, checkpoints, metrics, TensorBoard

Batch semantics: per-device batch x processes x grad_accum = global batch, e.g. 32 x 8 GPUs x 2 =
512 images per optimizer step. An "epoch" is one pass of the (wrapped) training plan; a "step" is
one optimizer step. With ``optim.lr_scaling=linear`` the peak lr is lr x global_batch / base_batch.

Nothing in the hot loop waits on the host: losses and gradient norms accumulate on the device and
are read once per ``train.log_every`` steps (the one device sync of an interval). Non-finite
gradients are detected on the device; DDP has already averaged the gradients, so every rank sees
the same gradient norm and takes the same decision. The fused optimizers take the non-finite flag
as ``found_inf`` and skip the update on the device (the trick GradScaler uses), so a skipped step
costs no sync either.

Preemption: SIGTERM/SIGUSR1 set a flag; ranks agree on it every step with an all-reduce on a
gloo group of their own (host memory, no device sync), stop at the same step boundary, save
``last`` and raise :class:`Preempted` (exit code ``errors.EXIT_PREEMPTED``).
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from .checkpoint import Checkpointer
from .config import Config, save_config, to_dict
from .data import Shard, build_loader
from .data.kaggle import DataIndex, pseudo_index, split, train_index
from .distributed import WorldInfo
from .errors import UserError
from .faults import from_env as faults_from_env
from .metrics import MetricsWriter, StepTimer, max_memory_bytes, roc_auc
from .models import build_model, head_name
from .profiling import ProfilerWindow
from .watchdog import NO_WATCHDOG, StopFlag, Watchdog


class Preempted(Exception):
    """Raised after a signal-triggered checkpoint; the CLI exits with EXIT_PREEMPTED."""


class NonFiniteError(UserError):
    pass


@dataclass
class EvalResult:
    index: np.ndarray  # positions in the split, each exactly once, sorted
    logits: np.ndarray
    labels: np.ndarray

    @property
    def probs(self) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logits))

    def metrics(self, prefix: str = "val") -> dict[str, float]:
        loss = float(np.mean(np.logaddexp(0, self.logits) - self.labels * self.logits))
        return {
            f"{prefix}/loss": loss,
            f"{prefix}/auc": roc_auc(self.labels, self.logits),
            f"{prefix}/n": len(self.index),
        }


def gather_unique(acc, index: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> EvalResult:
    """Gather (index, logit, label) rows from all ranks and keep each sample index once.

    Shards may differ in length (padding rows carry index -1) and may repeat samples (the padding of
    the evaluation plan or of DALI's ``pad_last_batch``); a sample's repeats have identical logits up
    to nondeterminism of the kernels, and the first one is kept."""
    local = torch.stack([index.double(), logits.double(), labels.double()], dim=1)
    local = acc.pad_across_processes(local, dim=0, pad_index=-1)
    allg = acc.gather(local).cpu().numpy()
    allg = allg[allg[:, 0] >= 0]
    positions, first = np.unique(allg[:, 0].astype(np.int64), return_index=True)
    return EvalResult(index=positions, logits=allg[first, 1], labels=allg[first, 2])


def lr_lambda_factory(warmup_steps: int, total_steps: int, min_ratio: float):
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def param_groups(model: nn.Module, cfg: Config, lr: float) -> list[dict]:
    """No weight decay on norms and biases; ``backbone_lr_mult`` for everything but the head."""
    head = head_name(model) + "."
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (name.startswith(head), p.ndim > 1)
        groups.setdefault(key, []).append(p)
    out = []
    for (is_head, decay), params in sorted(groups.items()):
        mult = 1.0 if is_head else cfg.optim.backbone_lr_mult
        out.append(
            {"params": params, "lr": lr * mult, "weight_decay": cfg.optim.weight_decay if decay else 0.0}
        )
    return out


def build_optimizer(model: nn.Module, cfg: Config, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg, lr)
    o = cfg.optim
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
    """Exponential moving average of parameters and buffers, kept on the device."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        import copy

        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_p = list(self.module.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1.0 - self.decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Mixer:
    """Mixup / CutMix on the device. Randomness comes from a host generator seeded by
    (seed, rank, micro-step), so no device sync and an exact replay after a resume."""

    def __init__(self, mixup: float, cutmix: float, prob: float, seed: int, rank: int) -> None:
        self.mixup, self.cutmix, self.prob, self.seed, self.rank = mixup, cutmix, prob, seed, rank

    def __call__(self, images: torch.Tensor, target: torch.Tensor, micro_step: int):
        rng = np.random.default_rng([self.seed, self.rank, micro_step, 0x313])
        if rng.random() >= self.prob:
            return images, target
        use_cutmix = self.cutmix > 0 and (self.mixup == 0 or rng.random() < 0.5)
        lam = float(rng.beta(*(2 * [self.cutmix if use_cutmix else self.mixup])))
        perm = torch.from_numpy(rng.permutation(images.shape[0]))
        if images.device.type == "cuda":  # a pageable host-to-device copy would block the host
            perm = perm.pin_memory()
        perm = perm.to(images.device, non_blocking=True)
        if use_cutmix:
            h, w = images.shape[-2:]
            ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
            cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
            images = images.clone()
            images[..., y0:y1, x0:x1] = images[perm][..., y0:y1, x0:x1]
            lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
        else:
            images = images * lam + images[perm] * (1 - lam)
        return images, target * lam + target[perm] * (1 - lam)


class Trainer:
    _watch = NO_WATCHDOG  # fit() arms a real one: evaluate() also runs outside fit()

    def __init__(self, cfg: Config, accelerator, world: WorldInfo) -> None:
        self.cfg, self.acc, self.world = cfg, accelerator, world
        self.device = accelerator.device
        self.is_main = accelerator.is_main_process
        self.run_dir = cfg.run_dir
        self.ckpt = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint.keep_last)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        elif torch.cuda.is_available():
            torch.backends.cudnn.benchmark = True  # input shapes are fixed: pick the fastest kernels

        d = cfg.data
        full = self._checked_index()
        self.train_idx, self.val_idx = split(full, d.n_folds, d.fold, cfg.seed)
        if d.pseudo_csv:
            # Pseudo-labelled test images join the training folds, never the validation fold.
            self.train_idx = self.train_idx.concat(pseudo_index(Path(d.root), Path(d.pseudo_csv)))
        self.shard = Shard(accelerator.process_index, accelerator.num_processes)
        if d.global_batch_size:
            per = self.shard.world * cfg.train.grad_accum
            if d.global_batch_size % per:
                raise UserError(
                    f"data.global_batch_size={d.global_batch_size} is not divisible by {self.shard.world} "
                    f"processes x train.grad_accum={cfg.train.grad_accum}; choose a multiple of {per}"
                )
            d.batch_size = d.global_batch_size // per
        self.channels_last = cfg.model.channels_last and self.device.type == "cuda"
        self.train_loader = build_loader(
            self.train_idx, cfg, self.shard, self.device, True, self.channels_last
        )
        self.val_loader = build_loader(self.val_idx, cfg, self.shard, self.device, False, self.channels_last)
        accum = cfg.train.grad_accum
        self.steps_per_epoch = self.train_loader.steps_per_epoch // accum
        if self.steps_per_epoch < 1:
            raise UserError(
                f"data.batch_size={d.batch_size} x {self.shard.world} processes x train.grad_accum={accum} "
                f"is larger than the {len(self.train_idx)} training images: lower the batch size"
            )
        self.global_batch = d.batch_size * self.shard.world * accum
        lr = cfg.optim.lr * (
            self.global_batch / cfg.optim.base_batch if cfg.optim.lr_scaling == "linear" else 1.0
        )
        self.peak_lr = lr

        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        model = build_model(cfg.model)
        if cfg.train.sync_bn and self.shard.world > 1 and self.device.type != "cuda":
            raise UserError("train.sync_bn=true needs CUDA devices (SyncBatchNorm runs on GPUs only)")
        if cfg.train.sync_bn and self.shard.world > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(
            self.device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format
        )
        self.raw_model = model
        self.ema = EMA(model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        optimizer = build_optimizer(model, cfg, lr)
        total = cfg.train.epochs * self.steps_per_epoch
        warmup = int(round(cfg.optim.warmup_epochs * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda_factory(warmup, total, cfg.optim.min_lr_ratio)
        )
        # The scheduler is stepped by us once per optimizer step, not prepared by Accelerate
        # (which would step it once per process).
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.inner_optimizer = optimizer
        if cfg.train.compile:
            self.model = torch.compile(self.model)

        self.faults = faults_from_env(
            self.shard.rank, attempt=world.restart_count + world.slurm_restart_count
        )
        t = cfg.train
        self.mixer = (
            Mixer(t.mixup_alpha, t.cutmix_alpha, t.mix_prob, cfg.seed, self.shard.rank)
            if (t.mixup_alpha > 0 or t.cutmix_alpha > 0)
            else None
        )
        self.epochs_without_improvement = 0
        self._max_norm = cfg.train.clip_grad_norm if cfg.train.clip_grad_norm > 0 else float("inf")
        # fp16's GradScaler skips non-finite steps itself; otherwise the fused optimizer does.
        self._use_found_inf = getattr(accelerator, "scaler", None) is None
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.best_auc = -1.0
        self.nonfinite_steps = 0
        self.history: list[dict] = []

    # ------------------------------------------------------------------------------------------
    def _checked_index(self) -> DataIndex:
        """The labelled index after the data check (cached by file sizes and mtimes): refuse with
        the list of problems, or with ``data.on_bad_file=skip`` leave the bad images out."""
        from .data.check import cached_check, check_data

        d = self.cfg.data
        cache_dir = Path(self.cfg.output.root) / ".data-check"
        with self.acc.main_process_first():  # main checks and caches; the others read the cache
            if d.check_cache:
                report = cached_check(Path(d.root), d.labels_csv, cache_dir)
            else:
                report = check_data(Path(d.root), d.labels_csv)
        report.require("train", d.on_bad_file)
        index = train_index(d.root, d.labels_csv, d.limit)
        keep = [i for i, n in enumerate(index.names) if n not in report.bad_names]
        if len(keep) < len(index):
            if self.is_main:
                for p in report.problems:
                    if p.fatal and p.path_or_name in report.bad_names:
                        print(f"[data] data.on_bad_file=skip: leaving out {p.message}", file=sys.stderr)
            index = index.subset(keep)
        return index

    def log(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        rng = [None] * self.shard.world
        if self.shard.world > 1:
            dist.all_gather_object(rng, rng_state(), group=self._stop.group)
        else:
            rng = [rng_state()]
        scaler = getattr(self.acc, "scaler", None)
        return {
            "model": self.raw_model.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "optimizer": self.inner_optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_auc": self.best_auc,
            "nonfinite_steps": self.nonfinite_steps,
            "epochs_without_improvement": self.epochs_without_improvement,
            "world_size": self.shard.world,
            "global_batch": self.global_batch,
            "config": to_dict(self.cfg),
        }

    def load_state_dict(self, state: dict) -> None:
        self.raw_model.load_state_dict(state["model"])
        if self.ema and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        self.inner_optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        scaler = getattr(self.acc, "scaler", None)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.best_auc = state["global_step"], state["best_auc"]
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        self.epochs_without_improvement = state.get("epochs_without_improvement", 0)
        if state.get("global_batch") != self.global_batch:
            raise UserError(
                f"the checkpoint was trained with global batch {state.get('global_batch')}, this run has "
                f"{self.global_batch}: resume with the same batch_size x processes x grad_accum"
            )
        if state["world_size"] == self.shard.world:
            set_rng_state(state["rng"][self.shard.rank])

    def save(self, is_best: bool = False) -> None:
        # No signal grace: a stop signal asks for this save; the launcher's shutdown timeout governs.
        with self._watch.waiting("the checkpoint (RNG gather, write on rank 0, barrier)", signal_grace=False):
            state = self.state_dict()  # collective (RNG states): every rank takes part
            if self.is_main:
                with self.faults.saving(self.global_step):
                    self.ckpt.save(state, self.global_step, is_best=is_best)
            self.acc.wait_for_everyone()

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, loader=None, model: nn.Module | None = None) -> EvalResult:
        """Score every sample of the loader's split exactly once, across all ranks."""
        loader = loader or self.val_loader
        if self.shard.world > 1:
            # BatchNorm running statistics differ per rank after a step; the checkpoint holds rank
            # 0's. Score that model everywhere (DDP broadcasts rank 0's buffers at the next forward
            # anyway, so training is unaffected).
            with self._watch.waiting("a collective (BatchNorm buffer broadcast)"):
                for module in (self.raw_model, self.ema.module if self.ema else None):
                    for b in module.buffers() if module is not None else ():
                        dist.broadcast(b, src=0)
        model = model or (self.ema.module if self.ema else self.raw_model)
        was_training = model.training
        model.eval()
        idx, logits, labels = [], [], []
        for batch in self._watch.iterate("data (an evaluation batch)", loader.iter_epoch(0)):
            with self.acc.autocast():
                out = model(batch.images).float().squeeze(1)
            idx.append(batch.index)
            logits.append(out)
            labels.append(batch.labels)
        model.train(was_training)
        with self._watch.waiting("a collective (the gather of predictions)"):
            return gather_unique(self.acc, torch.cat(idx), torch.cat(logits), torch.cat(labels))

    # ------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.cfg
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        resume = cfg.resume
        if not resume and (self.world.restart_count or self.world.slurm_restart_count):
            # torchrun --max-restarts restarted the workers, or Slurm requeued the job: carry on.
            resume = "auto"
        state = self.ckpt.load(resume)
        if state is not None:
            self.load_state_dict(state)
            self.log(
                f"resumed from {self.ckpt.resolve(resume)} at epoch {self.epoch} step {self.global_step}"
            )
        self._watch = Watchdog(self.shard.rank, cfg.dist.timeout_s)
        self._stop = StopFlag(self.shard.world, cfg.dist.timeout_s, self._watch)
        writer = None
        if self.is_main:
            # After a resume, drop what was logged past the checkpoint: those steps are redone.
            writer = MetricsWriter(
                self.run_dir, cfg.output.tensorboard, resume_step=self.global_step if state else None
            )
        self.log(
            f"global batch {self.global_batch} = {cfg.data.batch_size} per device x {self.shard.world} "
            f"processes x {cfg.train.grad_accum} accumulation; peak lr {self.peak_lr:g}; "
            f"{self.steps_per_epoch} steps/epoch; train {len(self.train_idx)} val {len(self.val_idx)} images; "
            f"device {self.device}; backend {cfg.data.backend}; precision {cfg.train.mixed_precision}"
        )
        try:
            with ProfilerWindow(cfg.profile, self.run_dir / "profile", self.shard.rank) as prof:
                patience = cfg.train.early_stop_patience
                while self.epoch < cfg.train.epochs:
                    if patience and self.epochs_without_improvement >= patience:
                        # Also when a run that stopped early is resumed: it stays stopped.
                        self.log(f"early stop: val/auc has not improved for {patience} epoch(s)")
                        break
                    t_epoch = time.perf_counter()
                    finished = self._train_epoch(writer, prof)
                    if not finished:  # train.max_steps reached inside the epoch
                        self.save()
                        break
                    val = self.evaluate().metrics()
                    val["perf/epoch_time_s"] = time.perf_counter() - t_epoch
                    is_best = val["val/auc"] > self.best_auc or self.best_auc < 0
                    if is_best:
                        self.best_auc = val["val/auc"]
                        self.epochs_without_improvement = 0
                    else:
                        self.epochs_without_improvement += 1
                    self.epoch += 1
                    self.step_in_epoch = 0
                    if writer:
                        writer.log(self.global_step, self.epoch, val)
                        writer.flush()
                    self.history.append({"epoch": self.epoch, **val})
                    self.log(
                        f"epoch {self.epoch}/{cfg.train.epochs}: val/auc {val['val/auc']:.4f} "
                        f"val/loss {val['val/loss']:.4f} (n={val['val/n']}) in {val['perf/epoch_time_s']:.1f}s"
                    )
                    self.save(is_best=is_best)
                    if self._max_steps_reached():
                        break
        finally:
            self._stop.close()  # also closes the watchdog
            self._watch = NO_WATCHDOG
            if writer:
                writer.close()
        return {
            "best_auc": self.best_auc,
            "global_step": self.global_step,
            "epoch": self.epoch,
            "history": self.history,
        }

    def _max_steps_reached(self) -> bool:
        return bool(self.cfg.train.max_steps) and self.global_step >= self.cfg.train.max_steps

    def train_step(self, next_batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step over ``grad_accum`` micro-batches drawn with ``next_batch()``.

        Returns (mean loss, gradient norm, non-finite flag) as device tensors; nothing here waits
        on the device. Gradients are all-reduced only on the last micro-step."""
        cfg, acc, model = self.cfg, self.acc, self.model
        accum = cfg.train.grad_accum
        smooth = cfg.train.label_smoothing
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(accum):
            with record_function("data"):
                batch = next_batch()
            ctx = contextlib.nullcontext() if micro == accum - 1 else acc.no_sync(model)
            with ctx:
                images, target = batch.images, batch.labels * (1 - smooth) + 0.5 * smooth
                if self.mixer is not None:
                    images, target = self.mixer(images, target, self.global_step * accum + micro)
                with record_function("forward"), acc.autocast():
                    logits = model(images).float().squeeze(1)
                    loss = F.binary_cross_entropy_with_logits(logits, target)
                    loss = self.faults.loss(loss, self.global_step + 1)
                with record_function("backward"):
                    acc.backward(loss / accum)
            loss_sum += loss.detach()
        with record_function("optimizer"):
            gnorm = acc.clip_grad_norm_(model.parameters(), self._max_norm)
            gnorm = gnorm.detach().float() if torch.is_tensor(gnorm) else torch.tensor(float(gnorm))
            if self._use_found_inf:
                bad = (~torch.isfinite(gnorm)).float()
                self.inner_optimizer.found_inf = bad
                self.inner_optimizer.grad_scale = None
            else:
                # fp16: GradScaler skips overflow steps and lowers its scale; routine, not a fault.
                bad = torch.zeros((), device=self.device)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema:
                self.ema.update(self.raw_model)
        return loss_sum / accum, gnorm, bad

    def _train_epoch(self, writer: MetricsWriter | None, prof: ProfilerWindow) -> bool:
        """Train from (epoch, step_in_epoch) to the end of the epoch. False if stopped early."""
        cfg = self.cfg
        accum = cfg.train.grad_accum
        self.model.train()
        it = iter(self.train_loader.iter_epoch(self.epoch, start_step=self.step_in_epoch * accum))
        timer = StepTimer()

        def next_batch():
            timer.data_start()
            with self._watch.waiting("data (a training batch)"):
                batch = next(it)
            timer.data_end()
            return batch

        loss_sum = torch.zeros((), device=self.device)
        gnorm_sum = torch.zeros((), device=self.device)
        nonfinite = torch.zeros((), device=self.device)
        interval_steps = 0
        while self.step_in_epoch < self.steps_per_epoch:
            loss, gnorm, bad = self.train_step(next_batch)
            loss_sum += loss
            nonfinite += bad
            gnorm_sum += torch.where(bad > 0, torch.zeros_like(gnorm), gnorm)
            self.global_step += 1
            self.step_in_epoch += 1
            interval_steps += 1
            timer.step_done(cfg.data.batch_size * accum)
            prof.step()
            self.faults.after_step(self.global_step)

            last_of_epoch = self.step_in_epoch == self.steps_per_epoch
            if self.global_step % cfg.train.log_every == 0 or last_of_epoch:
                self._log_interval(writer, timer, loss_sum, gnorm_sum, nonfinite, interval_steps)
                loss_sum.zero_(), gnorm_sum.zero_(), nonfinite.zero_()
                interval_steps = 0
            stop = self._stop.agreed()
            every = cfg.checkpoint.every_steps
            if stop or (every and self.global_step % every == 0 and not last_of_epoch):
                self.save()
            if stop:
                self.log(
                    f"{self._stop.signal_name or 'signal'} received: saved at step {self.global_step}, exiting"
                )
                raise Preempted(self.global_step)
            if self._max_steps_reached():
                return last_of_epoch
        return True

    def _log_interval(self, writer, timer, loss_sum, gnorm_sum, nonfinite, n) -> None:
        """The interval's one device sync: reduce across ranks, read, log."""
        acc = self.acc
        packed = torch.stack([loss_sum / n, gnorm_sum, nonfinite])
        with self._watch.waiting("a collective (the log interval's reduce)"):
            packed = acc.reduce(packed, reduction="mean")
            loss, gsum, bad = packed.tolist()  # <- the sync
        bad_steps = int(round(bad))
        good = max(n - bad_steps, 1)
        perf = timer.read(self.shard.world)
        metrics = {
            "train/loss": loss,
            "train/lr": self.scheduler.get_last_lr()[-1],
            "train/grad_norm": gsum / good,
            "perf/max_mem_bytes": float(max_memory_bytes(self.device)),
            **perf,
        }
        if bad_steps:
            self.nonfinite_steps += bad_steps
            metrics["train/nonfinite_steps"] = float(self.nonfinite_steps)
            if self.cfg.train.nonfinite == "stop":
                raise NonFiniteError(
                    f"non-finite loss or gradients at step {self.global_step} (within the last {n} steps); "
                    f"the update was not applied and {self.ckpt.last} still holds the last good state. "
                    "Lower optim.lr, use train.mixed_precision=bf16 instead of fp16, or set train.nonfinite=skip"
                )
            self.log(f"skipped {bad_steps} step(s) with non-finite gradients (total {self.nonfinite_steps})")
        if writer:
            writer.log(self.global_step, self.epoch + 1, metrics)
        self.log(
            f"epoch {self.epoch + 1} step {self.step_in_epoch}/{self.steps_per_epoch} (global {self.global_step}): "
            f"loss {loss:.4f} lr {metrics['train/lr']:.3g} {perf['perf/img_per_s']:.1f} img/s "
            f"data-wait {100 * perf['perf/data_wait_frac']:.0f}%"
        )

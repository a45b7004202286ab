"""The Trainer: one loop, readable top to bottom. It trains the parts it is given.

    parts = build_parts(cfg, accelerator, world)   # resume state, batch plan, data, model, optimizer
    result = Trainer(cfg, accelerator, world, parts).fit()   # epochs, validation, checkpoints, metrics

Batch semantics: per-device batch x processes x grad_accum = global batch, e.g. 32 x 8 GPUs x 2 =
512 images per optimizer step (resolved once, ``build.resolve_batch``). An "epoch" is
ceil(training images / global batch) optimizer steps over the (wrapped) epoch permutation; a "step"
is one optimizer step. With ``optim.lr_scaling=linear`` the peak lr is lr x global_batch / base_batch.

Elastic resume: a checkpoint saved by N processes continues on M with the same global batch (the
per-device batch and/or ``train.grad_accum=auto`` derived), at the same optimizer step of the same
epoch: step k trains on the same samples for any split, so the rest of the epoch is seen once.

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
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from accelerate.utils import get_grad_scaler
from torch import nn
from torch.profiler import record_function

from .build import BatchPlan, Data, build_data, build_model_on, resolve_batch, resolved_config
from .checkpoint import Checkpointer, refuse_mixed_run
from .config import Config, save_config, to_dict
from .data import Shard
from .distributed import WorldInfo, rank_host
from .errors import Preempted, UserError
from .evaluation import EvalResult, score
from .faults import NO_FAULTS, Faults
from .faults import from_env as faults_from_env
from .metrics import MetricsWriter, StepTimer, max_memory_bytes
from .models import binary_loss
from .optim import Optimization, build_optimization
from .profiling import ProfilerWindow
from .progress import ETA
from .watchdog import NO_WATCHDOG, StopFlag, Watchdog


class NonFiniteError(UserError):
    pass


# fp16 with train.nonfinite=stop: a loss scale below this means the gradients overflow fp16 even
# unscaled. Overflow steps are routine while the GradScaler finds its scale (it halves the scale and
# skips the step); a scale that keeps halving (from 65536: 17 skipped steps with no recovery) is a
# diverged run, which the stop rule reports.
FP16_MIN_SCALE = 1.0


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of ``grads``, leaving them alone (``get_total_norm``: torch >= 2.6)."""
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def improves(auc: float, loss: float, best_auc: float, best_loss: float) -> bool:
    """Whether a validation result beats the best so far: a higher AUC, or the same AUC with a lower
    loss. AUC moves in steps of 1 / (positives x negatives) and saturates on an easy fold, so ties
    are common (the demo's epochs 2 and 6 both scored 1.000, with val loss 0.216 and 0.031: the
    later one is the better model). A non-finite AUC never improves; any finite one beats a best
    that is unset (-1) or not finite (a checkpoint written before NaN was refused)."""
    if not math.isfinite(auc):
        return False
    if not math.isfinite(best_auc) or best_auc < 0:
        return True
    return auc > best_auc or (auc == best_auc and math.isfinite(loss) and loss < best_loss)


def val_metrics(result: EvalResult) -> dict[str, float]:
    """``result.metrics("val")``, or NaN AUC and loss when some logits are not finite (diverged
    weights, an fp16 overflow): the epoch is logged and can never be best."""
    bad = ~np.isfinite(result.logits)
    if not bad.any():
        return result.metrics("val")
    return {
        "val/loss": math.nan,
        "val/auc": math.nan,
        "val/n": len(result.index),
        "val/nonfinite": float(bad.sum()),
    }


def seed_rank(seed: int, rank: int) -> None:
    """Seed this rank's global random streams (torch on every device, Python, NumPy) for training,
    once the model is built: its initial weights come from ``seed`` alone, identical on every rank,
    while dropout and stochastic-depth masks must differ between ranks, as they would within one
    large batch (with one seed, every GPU drew the same masks)."""
    s = int(np.random.SeedSequence([seed, rank, 0x5EED]).generate_state(1, np.uint64)[0] >> 1)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)


def rng_state() -> dict:
    """This process's random states, whole: restored, they continue where they were."""
    py_version, py_internal, py_gauss = random.getstate()
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(py_internal),  # the 624 words and the position
        "python_gauss": py_gauss,  # None, or the second of the last pair random.gauss() drew
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "numpy_pos": int(pos),  # without it a restored stream restarts its 624-word block
        "numpy_gauss": (int(has_gauss), float(cached_gaussian)),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`. Checkpoints written before the NumPy position and cached
    Gaussians were saved load too, with NumPy's stream at the start of a block (as they did)."""
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state.get("python_gauss")))
    has_gauss, cached = state.get("numpy_gauss", (0, 0.0))
    np.random.set_state(
        ("MT19937", state["numpy"].numpy().astype(np.uint32), state.get("numpy_pos", 624), has_gauss, cached)
    )
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


@dataclass
class Parts:
    """What a Trainer trains with, built by :func:`build_parts` (or by hand in tests and tools)."""

    plan: BatchPlan  # the global batch and its split
    data: Data  # splits and both loaders
    model: nn.Module  # on the device, not yet prepared by Accelerate
    channels_last: bool
    opt: Optimization  # optimizer, schedule, EMA
    ckpt: Checkpointer  # the run's checkpoints (the one that read resume_state)
    faults: Faults = NO_FAULTS  # fault hooks (the fault-tolerance tests; no-op by default)
    resume_from: Path | None = None  # the checkpoint to continue from
    resume_state: dict | None = None  # its contents (read once: the batch plan needs them)


@dataclass
class FitResult:
    best_auc: float
    global_step: int
    epoch: int
    steps_run: int  # optimizer steps this call took (0: a finished run resumed)


def resume_source(cfg: Config, world: WorldInfo) -> str:
    """``resume`` as configured; ``auto`` when torchrun restarted the workers or Slurm requeued the job."""
    if not cfg.resume and (world.restart_count or world.slurm_restart_count):
        return "auto"
    return cfg.resume


def build_parts(
    cfg: Config, accelerator, world: WorldInfo, train_loader: bool = True, val_loader: bool = True
) -> Parts:
    """Read the checkpoint to resume from (if any), split its global batch over this run's
    processes, then build the data (the loaders asked for), the model and the optimization.
    Collective (the data check)."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True  # input shapes are fixed: pick the fastest kernels
    ckpt = Checkpointer(cfg.run_dir / "checkpoints", cfg.checkpoint.keep_last)
    resume = resume_source(cfg, world)
    # resume=auto skips a damaged checkpoint for the newest intact one (the main process says so).
    resume_from, state = ckpt.load_resume(resume, quiet=not accelerator.is_main_process)
    plan = resolve_batch(cfg, accelerator.num_processes, state.get("global_batch") if state else None)
    faults = faults_from_env(
        accelerator.process_index, attempt=world.restart_count + world.slurm_restart_count
    )
    data = build_data(cfg, accelerator, plan, train=train_loader, val=val_loader, faults=faults)
    model, channels_last = build_model_on(cfg, plan.world, accelerator.device)
    opt = build_optimization(model, cfg.optim, cfg.train, plan.global_batch, data.steps_per_epoch)
    seed_rank(cfg.seed, accelerator.process_index)  # a resume then restores the saved streams
    return Parts(plan, data, model, channels_last, opt, ckpt, faults, resume_from, state)


class Trainer:
    """Trains the parts it is given (:func:`build_parts`): ``fit()`` runs epochs, validation,
    checkpoints and metrics."""

    _watch = NO_WATCHDOG  # fit() arms a real one: evaluate() also runs outside fit()

    def __init__(self, cfg: Config, accelerator, world: WorldInfo, parts: Parts) -> None:
        self.cfg, self.acc, self.world = cfg, accelerator, world
        self.device = accelerator.device
        self.is_main = accelerator.is_main_process
        self.run_dir = cfg.run_dir
        self.ckpt = parts.ckpt
        self.plan = parts.plan
        self.shard = Shard(accelerator.process_index, self.plan.world, self.plan.accum)
        d = parts.data
        self.train_idx, self.val_idx = d.train_idx, d.val_idx
        self.train_loader, self.val_loader = d.train_loader, d.val_loader
        self.steps_per_epoch = d.steps_per_epoch
        self.global_batch = self.plan.global_batch
        self.channels_last = parts.channels_last
        self.peak_lr = parts.opt.peak_lr
        self.raw_model = parts.model
        self.ema = parts.opt.ema
        self.scheduler = parts.opt.scheduler
        # The scheduler is stepped by us once per optimizer step, not prepared by Accelerate
        # (which would step it once per process).
        if getattr(accelerator, "scaler", None) is not None:
            # fp16: a fresh GradScaler for each Trainer. The Accelerator owns the scaler and outlives
            # a Trainer (cv trains every fold with one): fold k would start from fold k-1's loss
            # scale and growth count. Made as Accelerate makes it (with its GradScalerKwargs, if any).
            handler = getattr(accelerator, "scaler_handler", None)
            accelerator.scaler = get_grad_scaler(
                accelerator.distributed_type, **(handler.to_kwargs() if handler is not None else {})
            )
        self.scaler = getattr(accelerator, "scaler", None)  # None unless fp16
        self.model, self.optimizer = accelerator.prepare(parts.model, parts.opt.optimizer)
        self.inner_optimizer = parts.opt.optimizer
        if cfg.train.compile:
            self.model = torch.compile(self.model)
        self._resume_from, self._resume_state = parts.resume_from, parts.resume_state
        parts.resume_state = None  # fit() drops it after loading: no copy lingers with the caller

        self.faults = parts.faults
        t = cfg.train
        self.mixer = (
            Mixer(t.mixup_alpha, t.cutmix_alpha, t.mix_prob, cfg.seed, self.shard.rank)
            if (t.mixup_alpha > 0 or t.cutmix_alpha > 0)
            else None
        )
        self.epochs_without_improvement = 0
        self._max_norm = cfg.train.clip_grad_norm if cfg.train.clip_grad_norm > 0 else float("inf")
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.best_auc = -1.0  # -1: no finite validation result yet
        self.best_loss = math.inf  # the best epoch's val/loss: breaks AUC ties
        # With EMA on, each epoch scores the raw and the EMA weights and keeps the better ("raw" or
        # "ema"): the source of the best epoch, and the pick of the latest validation (what the
        # checkpoint's "eval_weights" names for predict and cv).
        self.best_source = ""
        self.eval_source = "ema" if self.ema else "raw"
        self.nonfinite_steps = 0

    # ------------------------------------------------------------------------------------------
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
            "ema_updates": self.ema.updates if self.ema else 0,
            # The state key of the weights that validated better at the latest epoch end: predict
            # and cv score these (in best.pt, the weights of the best epoch).
            "eval_weights": "ema" if self.ema and self.eval_source == "ema" else "model",
            "best_source": self.best_source,
            "optimizer": self.inner_optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_auc": self.best_auc,
            "best_loss": self.best_loss,
            "nonfinite_steps": self.nonfinite_steps,
            "epochs_without_improvement": self.epochs_without_improvement,
            "world_size": self.shard.world,
            "global_batch": self.global_batch,
            "config": to_dict(self.cfg),
        }

    def load_state_dict(self, state: dict) -> None:
        # A changed model.arch or model.aux_loss_weight: refuse by name before torch does (a removed aux
        # head is a None submodule, whose saved keys torch's strict load does not report).
        saved, ours = set(state["model"]), set(self.raw_model.state_dict())
        if saved != ours:
            diff = sorted(saved - ours)[:2] + sorted(ours - saved)[:2]
            raise UserError(
                f"{self._resume_from}: the checkpoint's model does not match this run's "
                f"(model.arch={self.cfg.model.arch}, model.aux_loss_weight={self.cfg.model.aux_loss_weight}; "
                f"differing keys such as {', '.join(diff)}). Resume with the settings it was trained with, "
                "or start a new run (output.name=<new name>)"
            )
        self.raw_model.load_state_dict(state["model"])
        if self.ema and state.get("ema"):
            # A checkpoint from before the count was saved: its EMA is past any warm-up.
            self.ema.load_state_dict(state["ema"], state.get("ema_updates", state["global_step"]))
        elif self.ema:
            self.ema.reset(self.raw_model)  # EMA switched on now: it starts from the resumed weights
            self.log(f"train.ema_decay={self.cfg.train.ema_decay}: the EMA starts from the resumed weights")
        self.inner_optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        scaler = getattr(self.acc, "scaler", None)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.best_auc = state["global_step"], state["best_auc"]
        self.best_loss = state.get("best_loss", math.inf)
        self.best_source = state.get("best_source", "")
        self.eval_source = "ema" if state.get("eval_weights", "ema") == "ema" and self.ema else "raw"
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        self.epochs_without_improvement = state.get("epochs_without_improvement", 0)
        if state.get("global_batch") != self.global_batch:  # resolve_batch keeps it: a bug if not
            raise RuntimeError(
                f"global batch {self.global_batch} != the checkpoint's {state.get('global_batch')}"
            )
        if state["world_size"] == self.shard.world:
            set_rng_state(state["rng"][self.shard.rank])
        # On another process count the data position still holds (optimizer step k trains on the
        # same G samples however G is split), but per-rank random streams cannot carry over:
        # augmentation and mixup draws are seeded by rank, so the continuation is close to, not
        # bit-identical with, an uninterrupted run.

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
    def evaluate(self, model: nn.Module | None = None) -> EvalResult:
        """Score every sample of the validation split exactly once, across all ranks, with
        ``model`` (the raw model by default; ``self.ema.module`` for the EMA)."""
        model = self.raw_model if model is None else model
        if self.shard.world > 1:
            # BatchNorm running statistics differ per rank after a step; the checkpoint holds rank
            # 0's. Score that model everywhere (DDP broadcasts rank 0's buffers at the next forward
            # anyway, so training is unaffected).
            with self._watch.waiting("a collective (BatchNorm buffer broadcast)"):
                for b in model.buffers():
                    dist.broadcast(b, src=0)
        return score(model, self.val_loader, self.acc, "validation", self._watch)

    def validate(self) -> tuple[dict[str, float], str]:
        """The epoch's validation metrics and the weights they come from ("raw" or "ema").

        With EMA on, both the raw and the EMA weights are scored (``val/auc_raw``,
        ``val/loss_raw``, ``val/auc_ema``, ``val/loss_ema``; ``val/ema`` 1 when the EMA's are kept)
        and ``val/*`` are the better one's: a higher AUC, on a tie the lower loss, the EMA when
        both are equal. A bad EMA (a decay too slow for the run) shows and cannot lower the result;
        the price is a second pass over the validation fold."""
        raw = val_metrics(self.evaluate(self.raw_model))
        if self.ema is None:
            return raw, "raw"
        ema = val_metrics(self.evaluate(self.ema.module))
        source = (
            "raw" if improves(raw["val/auc"], raw["val/loss"], ema["val/auc"], ema["val/loss"]) else "ema"
        )
        out = dict(raw if source == "raw" else ema)
        for name, m in (("raw", raw), ("ema", ema)):
            out[f"val/auc_{name}"], out[f"val/loss_{name}"] = m["val/auc"], m["val/loss"]
        out["val/ema"] = float(source == "ema")
        return out, source

    # ------------------------------------------------------------------------------------------
    def fit(self) -> FitResult:
        cfg = self.cfg
        refuse_mixed_run(self.run_dir, resume_source(cfg, self.world), self.acc, cfg)  # one run per directory
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # The resolved file holds the per-device batch this run used.
            save_config(resolved_config(cfg, self.plan), self.run_dir / "config.yaml")
            self.ckpt.claim()  # an earlier attempt that thaws later can no longer replace our files
        state, self._resume_state = self._resume_state, None  # the trainer keeps no second copy
        if state is not None:
            self.load_state_dict(state)
            moved = (
                f" (saved by {state['world_size']} process{'es' if state['world_size'] != 1 else ''}, "
                f"continued on {self.shard.world})"
                if state["world_size"] != self.shard.world
                else ""
            )
            self.log(f"resumed from {self._resume_from} at epoch {self.epoch} step {self.global_step}{moved}")
        first_step = self.global_step
        self._watch = Watchdog(self.shard.rank, cfg.dist.timeout_s)
        self._stop = StopFlag(self.shard.world, cfg.dist.timeout_s, self._watch)
        total_steps = cfg.train.epochs * self.steps_per_epoch
        self._run_eta = ETA(min(total_steps, cfg.train.max_steps or total_steps), self.global_step)
        writer = None
        if self.is_main:
            # After a resume, drop what was logged past the checkpoint: those steps are redone.
            writer = MetricsWriter(
                self.run_dir, cfg.output.tensorboard, resume_step=self.global_step if state else None
            )
            if writer.set_aside:
                self.log(
                    f"no checkpoint to continue: {self.run_dir} starts again from step 0; what the earlier "
                    f"attempt logged (metrics.jsonl, tb/) is now in {writer.set_aside}"
                )
        self.log(
            f"{self.plan.describe()}; peak lr {self.peak_lr:g}; "
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
                    t_val = time.perf_counter()
                    val, self.eval_source = self.validate()
                    t_end = time.perf_counter()
                    val["perf/train_time_s"], val["perf/val_time_s"] = t_val - t_epoch, t_end - t_val
                    val["perf/epoch_time_s"] = t_end - t_epoch
                    is_best = improves(val["val/auc"], val["val/loss"], self.best_auc, self.best_loss)
                    val["val/is_best"] = float(is_best)  # what `report` shows as best
                    if is_best:
                        self.best_auc, self.best_loss = val["val/auc"], val["val/loss"]
                        self.best_source = self.eval_source
                        self.epochs_without_improvement = 0
                    else:
                        self.epochs_without_improvement += 1
                    self.epoch += 1
                    self.step_in_epoch = 0
                    if writer:
                        writer.log(self.global_step, self.epoch, val)
                        writer.flush()
                    both = (
                        f" {self.eval_source} weights (raw {val['val/auc_raw']:.4f}/{val['val/loss_raw']:.4f}, "
                        f"ema {val['val/auc_ema']:.4f}/{val['val/loss_ema']:.4f})"
                        if self.ema
                        else ""
                    )
                    self.log(
                        f"epoch {self.epoch}/{cfg.train.epochs}: val/auc {val['val/auc']:.4f} "
                        f"val/loss {val['val/loss']:.4f} (n={val['val/n']}){both}{', best' if is_best else ''}; "
                        f"train {val['perf/train_time_s']:.1f}s + val {val['perf/val_time_s']:.1f}s; "
                        f"{time.strftime('%H:%M:%S')} ETA run {self._run_eta.line(self.global_step)}"
                    )
                    self.save(is_best=is_best)
                    if self._max_steps_reached():
                        break
        except RuntimeError as e:  # e.g. a lost peer: cli.main names the step it happened at
            e.global_step = self.global_step
            raise
        finally:
            self._stop.close()  # also closes the watchdog
            self._watch = NO_WATCHDOG
            if writer:
                writer.close()
        return FitResult(self.best_auc, self.global_step, self.epoch, self.global_step - first_step)

    def _max_steps_reached(self) -> bool:
        return bool(self.cfg.train.max_steps) and self.global_step >= self.cfg.train.max_steps

    def train_step(self, next_batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step over ``grad_accum`` micro-batches drawn with ``next_batch()``.

        Returns (mean loss, gradient norm, non-finite flag) as device tensors; nothing here waits
        on the device. Gradients are all-reduced only on the last micro-step."""
        cfg, acc, model = self.cfg, self.acc, self.model
        accum = self.plan.accum
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
                    loss = binary_loss(model(images), target, cfg.model.aux_loss_weight)
                    loss = self.faults.loss(loss, self.global_step + 1)
                with record_function("backward"):
                    acc.backward(loss / accum)
            loss_sum += loss.detach()
        with record_function("optimizer"):
            if self._max_norm < math.inf:
                gnorm = acc.clip_grad_norm_(model.parameters(), self._max_norm)
            else:
                # Clipping off: measure only (clip_grad_norm_(inf) would multiply every gradient by
                # 1). Under fp16 the gradients are unscaled first, as clip_grad_norm_ does.
                acc.unscale_gradients(self.optimizer)
                gnorm = total_norm([p.grad for p in model.parameters() if p.grad is not None])
            gnorm = gnorm.detach().float() if torch.is_tensor(gnorm) else torch.tensor(float(gnorm))
            if self.scaler is None:
                bad = (~torch.isfinite(gnorm)).float()
                self.inner_optimizer.found_inf = bad
                self.inner_optimizer.grad_scale = None
            else:
                scale_before = self.scaler._scale.clone()  # set by the first backward's scale()
            self.optimizer.step()
            if self.scaler is not None:
                # fp16: the GradScaler skipped this step (gradients overflowed) iff it lowered its
                # scale; compared on the device, read once per log interval.
                bad = (self.scaler._scale < scale_before).float()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema:
                self.ema.update(self.raw_model)
        return loss_sum / accum, gnorm, bad

    def _train_epoch(self, writer: MetricsWriter | None, prof: ProfilerWindow) -> bool:
        """Train from (epoch, step_in_epoch) to the end of the epoch. False if stopped early."""
        cfg = self.cfg
        accum = self.plan.accum
        self.model.train()
        it = iter(self.train_loader.iter_epoch(self.epoch, start_step=self.step_in_epoch * accum))
        timer = StepTimer()
        self._epoch_eta = ETA(self.steps_per_epoch, self.step_in_epoch)

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
            timer.step_done(self.plan.per_device * accum)
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
        scale = self.scaler._scale.float() if self.scaler is not None else torch.zeros((), device=self.device)
        packed = torch.stack([loss_sum / n, gnorm_sum, nonfinite, scale.to(loss_sum.device)])
        with self._watch.waiting("a collective (the log interval's reduce)"):
            packed = acc.reduce(packed, reduction="mean")
            loss, gsum, bad, scale = packed.tolist()  # <- the sync
        bad_steps = int(round(bad))
        good = max(n - bad_steps, 1)
        perf = timer.read(self.shard.world)
        worst = ""
        if self.shard.world > 1:  # each rank's input wait: a slow node's pipeline vs a slow node or link
            with self._watch.waiting("a collective (the log interval's data-wait gather)"):
                local = torch.tensor([perf["perf/data_wait_frac"]], device=self.device)
                waits = acc.gather(local).tolist()
            r = max(range(len(waits)), key=waits.__getitem__)
            perf["perf/data_wait_frac_max"], perf["perf/data_wait_max_rank"] = waits[r], float(r)
            worst = f" (max {100 * waits[r]:.0f}% on {rank_host(r)})"
        metrics = {
            "train/loss": loss,
            "train/lr": self.scheduler.get_last_lr()[-1],
            "train/grad_norm": gsum / good,
            "perf/max_mem_bytes": float(max_memory_bytes(self.device)),
            **perf,
        }
        stop = self.cfg.train.nonfinite == "stop"
        if self.scaler is not None:
            metrics["train/loss_scale"] = scale
            if bad_steps:
                self.nonfinite_steps += bad_steps
                metrics["train/nonfinite_steps"] = float(self.nonfinite_steps)
                self.log(
                    f"fp16: the loss scaler skipped {bad_steps} overflow step(s) (total {self.nonfinite_steps}); "
                    f"loss scale now {scale:g}"
                )
            if stop and scale < FP16_MIN_SCALE:
                raise NonFiniteError(
                    f"fp16 loss scale fell to {scale:g} by step {self.global_step}: the gradients are not finite "
                    f"even unscaled (each overflow halves the scale and skips the step; "
                    f"{self.nonfinite_steps} skipped so far). No bad update was applied and {self.ckpt.last} "
                    "holds the last saved state. Lower optim.lr, use train.mixed_precision=bf16 on GPUs "
                    "that have it, or set train.nonfinite=skip"
                )
        elif bad_steps:
            self.nonfinite_steps += bad_steps
            metrics["train/nonfinite_steps"] = float(self.nonfinite_steps)
            if stop:
                raise NonFiniteError(
                    f"non-finite loss or gradients at step {self.global_step} (within the last {n} steps); "
                    f"the update was not applied and {self.ckpt.last} still holds the last good state. "
                    "Lower optim.lr, set train.clip_grad_norm (e.g. 1.0), or set train.nonfinite=skip"
                )
            self.log(f"skipped {bad_steps} step(s) with non-finite gradients (total {self.nonfinite_steps})")
        if writer:
            writer.log(self.global_step, self.epoch + 1, metrics)
        self.log(
            f"epoch {self.epoch + 1} step {self.step_in_epoch}/{self.steps_per_epoch} (global {self.global_step}): "
            f"loss {loss:.4f} lr {metrics['train/lr']:.3g} {perf['perf/img_per_s']:.1f} img/s "
            f"data-wait {100 * perf['perf/data_wait_frac']:.0f}%{worst} step {perf['perf/step_time_s']:.2f}s | "
            f"{time.strftime('%H:%M:%S')} "
            f"ETA epoch {self._epoch_eta.line(self.step_in_epoch)} run {self._run_eta.line(self.global_step)}"
        )

"""Scoring a split exactly once across ranks: the result type and the gather that builds it.

    result = score(model, loader, acc)      # every sample of the loader's split once, all ranks
    result.metrics("val")                   # {"val/loss", "val/auc", "val/n"}

Used by the Trainer (validation), cv (out-of-fold predictions) and predict (test images).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .metrics import roc_auc
from .progress import track
from .watchdog import NO_WATCHDOG


@dataclass
class EvalResult:
    index: np.ndarray  # positions in the split, each exactly once, sorted
    logits: np.ndarray
    labels: np.ndarray

    @property
    def probs(self) -> np.ndarray:
        return np.exp(-np.logaddexp(0.0, -self.logits))  # the sigmoid, without overflow

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


@torch.no_grad()
def score(model: nn.Module, loader, acc, desc: str = "scoring", watch=NO_WATCHDOG) -> EvalResult:
    """Logits of every sample of ``loader``'s split, once, gathered from all ranks. Collective."""
    was_training = model.training
    model.eval()
    idx, logits, labels = [], [], []
    batches = track(
        watch.iterate("data (an evaluation batch)", loader.iter_epoch(0)),
        desc,
        loader.steps_per_epoch,
        "batch",
        acc.is_main_process,
    )
    for batch in batches:
        with acc.autocast():
            out = model(batch.images).float().squeeze(1)
        idx.append(batch.index)
        logits.append(out)
        labels.append(batch.labels)
    model.train(was_training)
    with watch.waiting("a collective (the gather of predictions)"):
        return gather_unique(acc, torch.cat(idx), torch.cat(logits), torch.cat(labels))

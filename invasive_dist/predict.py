"""Prediction: a trained run (or several) -> Kaggle ``submission.csv``.

    invasive-dist predict --run runs/demo --data data/synthetic            # runs/demo/submission.csv
    torchrun --nproc_per_node=8 -m invasive_dist predict --run runs/r50 --data /data/invasive

The run's resolved ``config.yaml`` rebuilds the model and the evaluation transform; the ``best``
checkpoint is loaded (its EMA weights when the run kept them). Test images are sharded across ranks,
every image is scored exactly once, and the main process writes the submission atomically, in the
sample submission's order and with its names. ``predict.tta`` averages the probabilities of several
views (flips, or the 8 dihedral views: flips x 90 degree rotations), built on the device.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .checkpoint import Checkpointer, load_checkpoint
from .config import Config, load_config
from .data import Shard, build_loader
from .data.kaggle import DataIndex, test_index
from .errors import UserError
from .models import build_model


def tta_views(images: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The views of a batch (B, C, H, W) for test-time augmentation."""
    if mode == "none":
        return [images]
    if mode == "flips":
        return [images, images.flip(-1), images.flip(-2), images.flip(-1).flip(-2)]
    if mode == "dihedral":
        views = []
        for k in range(4):
            r = torch.rot90(images, k, dims=(-2, -1))
            views += [r, r.flip(-1)]
        return views
    raise UserError(f"predict.tta={mode!r} is not one of none, flips, dihedral")


def load_run_config(run_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a training run: {path} is missing")
    return load_config(path, ["resume=''", *overrides])


def load_model_for_inference(cfg: Config, run_dir: Path, which: str) -> torch.nn.Module:
    ckpt = Checkpointer(Path(run_dir) / "checkpoints")
    path = ckpt.best if which == "best" else ckpt.last
    if not path.is_file():
        raise UserError(f"{path} does not exist: train the run first (invasive-dist train), or use "
                        "predict.checkpoint=last")
    state = load_checkpoint(path)
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.weights = None  # everything comes from the checkpoint; never download here
    model = build_model(model_cfg)
    model.load_state_dict(state["ema"] if state.get("ema") else state["model"])
    return model.eval()


@torch.no_grad()
def predict_logits(model, loader, acc, tta: str, channels_last: bool) -> tuple[np.ndarray, np.ndarray]:
    """(positions, mean probability over views), every sample once, on every rank."""
    from .train import gather_unique

    idx, probs, labels = [], [], []
    for batch in loader.iter_epoch(0):
        acc_p = torch.zeros(batch.images.shape[0], device=batch.images.device)
        views = tta_views(batch.images, tta)
        for v in views:
            if channels_last:
                v = v.contiguous(memory_format=torch.channels_last)
            with acc.autocast():
                acc_p += torch.sigmoid(model(v).float().squeeze(1))
        idx.append(batch.index)
        probs.append(acc_p / len(views))
        labels.append(batch.labels)
    res = gather_unique(acc, torch.cat(idx), torch.cat(probs), torch.cat(labels))
    return res.index, res.logits  # the "logits" column holds probabilities here


def write_submission(names: list[str], probs: np.ndarray, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    pd.DataFrame({"name": names, "invasive": np.clip(probs, 0.0, 1.0)}).to_csv(tmp, index=False)
    os.replace(tmp, out)


def predict_run(
    run_dir: Path, data_root: Path, acc, out: Path | None = None, overrides: tuple[str, ...] = ()
) -> Path | None:
    """Predict the test set of ``data_root`` with one run; returns the submission path (main only)."""
    cfg = load_run_config(run_dir, overrides)
    cfg.data.root = str(data_root)
    index: DataIndex = test_index(data_root)
    missing = [p for p in index.paths if not p.is_file()]
    if missing:
        raise UserError(
            f"{len(missing)} test image(s) listed in {data_root}/sample_submission.csv are missing, "
            f"e.g. {missing[0]}; run `invasive-dist check-data --data {data_root}`"
        )
    device = acc.device
    channels_last = cfg.model.channels_last and device.type == "cuda"
    model = load_model_for_inference(cfg, run_dir, cfg.predict.checkpoint).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    shard = Shard(acc.process_index, acc.num_processes)
    if cfg.data.backend in ("synthetic",):
        raise UserError("data.backend=synthetic produces random tensors; predict needs a real backend")
    loader = build_loader(index, cfg, shard, device, train=False, channels_last=channels_last)
    positions, probs = predict_logits(model, loader, acc, cfg.predict.tta, channels_last)
    if len(positions) != len(index) or not np.array_equal(positions, np.arange(len(index))):
        raise RuntimeError(f"prediction covered {len(positions)} of {len(index)} test images")  # a bug
    out = Path(out) if out else Path(run_dir) / "submission.csv"
    if acc.is_main_process:
        write_submission(index.names, probs, out)
    acc.wait_for_everyone()
    return out

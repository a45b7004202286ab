"""Data: the Kaggle layout (``kaggle``), the batch contract (``base``) and the backends.

``build_loader`` is the one place a backend is chosen; every backend takes the same arguments and
yields the same ``Batch``.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from .base import Batch, Loader, Shard
from .kaggle import DataIndex

BACKENDS = ("torch", "dali", "gpu_cache", "synthetic")


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(name: str) -> str:
    """``auto`` is dali where it imports, else torch."""
    if name == "auto":
        return "dali" if dali_available() else "torch"
    if name == "dali" and not dali_available():
        raise UserError(
            "data.backend=dali but nvidia.dali does not import; install nvidia-dali-cuda130 "
            "(or nvidia-dali-cuda120 for CUDA 12 drivers) or use data.backend=torch"
        )
    return name


def build_loader(
    index: DataIndex,
    cfg,
    shard: Shard,
    device: torch.device,
    train: bool,
    channels_last: bool = False,
) -> Loader:
    backend = resolve_backend(cfg.data.backend)
    args = (index, cfg.data, shard, device, train, cfg.seed, channels_last)
    if backend == "torch":
        from .torch_backend import TorchLoader

        return TorchLoader(*args)
    if backend == "dali":
        from .dali import DaliLoader

        return DaliLoader(*args)
    if backend == "gpu_cache":
        from .gpu_cache import GpuCacheLoader

        return GpuCacheLoader(*args)
    if backend == "synthetic":
        from .synthetic import SyntheticLoader

        return SyntheticLoader(*args)
    raise UserError(f"data.backend={backend!r} is not one of auto, {', '.join(BACKENDS)}")


__all__ = ["Batch", "DataIndex", "Loader", "Shard", "build_loader", "resolve_backend"]

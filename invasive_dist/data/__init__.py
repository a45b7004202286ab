"""Data: the Kaggle layout (``kaggle``), the loader contract (``base``) and the backends.

    spec = LoaderSpec.of(index, cfg.data, Shard(rank, world), device, train=True, seed=cfg.seed)
    loader = build_loader(spec, cfg.data)          # the backend data.backend names, its own section

One contract: every backend is a class built from a frozen :class:`LoaderSpec` (the split, image
geometry, shard, batch, seed, device) and its own config section (``data.torch``, ``data.dali``,
``data.gpu_cache``; declared beside the backend), and yields the same ``Batch``. :data:`BACKENDS` is
the registry; a backend's module is imported only when it is built (DALI is optional).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import UserError
from .base import Batch, ImageSpec, Loader, LoaderSpec, Shard
from .kaggle import DataIndex


@dataclass(frozen=True)
class Backend:
    """A registry entry: where the loader class lives and which ``data.*`` section configures it."""

    module: str  # module of invasive_dist.data
    loader: str  # the class: Loader(spec, section)
    section: str | None  # the DataConfig field holding its settings (None: it has none)

    def loader_class(self) -> type:
        return getattr(importlib.import_module(f"{__name__}.{self.module}"), self.loader)


BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch_backend", "TorchLoader", "torch"),
    "dali": Backend("dali", "DaliLoader", "dali"),
    "gpu_cache": Backend("gpu_cache", "GpuCacheLoader", "gpu_cache"),
    "synthetic": Backend("synthetic", "SyntheticLoader", None),
}


def dali_version() -> str | None:
    """nvidia.dali's version, or None where it does not import (optional, heavy: imported here,
    only when asked)."""
    try:
        import nvidia.dali
    except Exception:
        return None
    return nvidia.dali.__version__


def dali_available() -> bool:
    return dali_version() is not None


def resolve_backend(name: str) -> str:
    """``auto`` is dali where it imports, else torch."""
    if name == "auto":
        return "dali" if dali_available() else "torch"
    if name not in BACKENDS:
        raise UserError(f"data.backend={name!r} is not one of auto, {', '.join(BACKENDS)}")
    if name == "dali" and not dali_available():
        raise UserError(
            "data.backend=dali but nvidia.dali does not import; install nvidia-dali-cuda130 "
            "(or nvidia-dali-cuda120 for CUDA 12 drivers) or use data.backend=torch"
        )
    return name


def build_loader(spec: LoaderSpec, data) -> Loader:
    """The loader of ``data.backend`` (a ``DataConfig``) for ``spec``, built with its own section."""
    backend = BACKENDS[resolve_backend(data.backend)]
    section = getattr(data, backend.section) if backend.section else None
    return backend.loader_class()(spec, section)


__all__ = [
    "BACKENDS",
    "Batch",
    "DataIndex",
    "ImageSpec",
    "Loader",
    "LoaderSpec",
    "Shard",
    "build_loader",
    "dali_available",
    "dali_version",
    "resolve_backend",
]

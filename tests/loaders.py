"""Loaders for tests, built the way ``build.build_data`` builds them: a ``LoaderSpec`` and the
backend registry (``data.build_loader``) with the backend's own config section.

    loader = make_loader("dali", index, cfg.data, Shard(0, 2), CPU, train=True, seed=0)
"""

from __future__ import annotations

import dataclasses

import torch

from invasive_dist.config import DataConfig
from invasive_dist.data import LoaderSpec, Shard, build_loader

CPU = torch.device("cpu")
ONE_PROCESS = Shard()


def make_loader(
    backend: str,
    index,
    d: DataConfig,
    shard: Shard = ONE_PROCESS,
    device: torch.device = CPU,
    train: bool = True,
    seed: int = 0,
    channels_last: bool = False,
    **spec,
):
    """The ``backend`` loader of ``index`` with the settings of ``d`` (its ``backend`` is ignored);
    ``spec``: other :meth:`LoaderSpec.of` arguments (``per_device``, ``epochs``)."""
    s = LoaderSpec.of(index, d, shard, device, train, seed, channels_last, **spec)
    return build_loader(s, dataclasses.replace(d, backend=backend))

"""The synthetic backend: random normalized images made on the device once, for measuring compute
alone (``invasive-dist bench``, ``data.backend=synthetic``); nothing is read from disk.

Batches follow the same plans as the torch backend (``base.train_plan`` / ``base.eval_plan``), so
``steps_per_epoch``, the sample indices and the labels' shape are what a real backend yields; the
images cycle through a pool of ``POOL`` pre-made batches (no work per step), and each sample index
has a fixed random 0/1 label. Each epoch's plan goes to the device in one copy, on CUDA from pinned
memory without a host sync.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .base import Batch, LoaderBase, LoaderSpec, eval_plan, train_plan, train_steps

POOL = 2  # distinct batches kept on the device; 2 x 256 x 3 x 224 x 224 float32 = 308 MB


class SyntheticLoader(LoaderBase):
    def __init__(self, spec: LoaderSpec, cfg: None = None) -> None:
        super().__init__(spec)
        if self.train:
            self.steps_per_epoch = train_steps(self.n, self.batch, self.shard)
        else:
            self.plan = eval_plan(self.n, self.batch, self.shard)
            self.steps_per_epoch = len(self.plan)
        gen = torch.Generator().manual_seed(self.seed)
        h, w = self.image.size
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.pool = [
            torch.randn((self.batch, 3, h, w), generator=gen).to(self.device, memory_format=fmt)
            for _ in range(POOL)
        ]
        self.labels = torch.randint(0, 2, (self.n,), generator=gen).float().to(self.device)

    def _to_device(self, arr: np.ndarray) -> torch.Tensor:
        """The epoch's plan on the device. On CUDA from pinned memory without blocking: a pageable
        copy would make the host wait for every queued step at each epoch start (a sync that the
        other backends do not have); on CPU the tensor itself."""
        t = torch.from_numpy(np.ascontiguousarray(arr))
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def iter_epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        if self.train:
            plan = train_plan(self.n, self.batch, self.shard, self.seed, epoch)
            steps = list(self._to_device(plan).unbind(0))
        else:
            flat = self._to_device(np.concatenate(self.plan))
            steps = list(flat.split([len(p) for p in self.plan]))
        for step in range(start_step, self.steps_per_epoch):
            idx = steps[step]
            yield Batch(images=self.pool[step % POOL][: idx.numel()], labels=self.labels[idx], index=idx)

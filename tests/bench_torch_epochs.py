"""The torch backend on CPU across epochs: images per second and the wait for each epoch's first batch.

    python -m invasive_dist synth --out /tmp/jpegs --n-train 600 --n-test 10 --workers 2
    python tests/bench_torch_epochs.py /tmp/jpegs --batch 64 --workers 2 --epochs 3

The shape of a Kaggle fold scaled down: the 480 training images of fold 0 of 5 (real size, 1154x866)
at batch 64 are 8 steps per epoch, as 1,836 images at batch 256 are. The loader alone is drawn, as
the training loop draws it (one ``iter_epoch`` per epoch, the spec knowing the epochs); ``--eval-s``
pauses between epochs as an evaluation would. Printed per epoch: the wait for its first batch, the
median wait for the others, and the epoch's images per second; then the rate over the epochs after
the first (the first holds the workers' start). docs/performance.md quotes what it measured.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import psutil
import torch

from invasive_dist.config import DataConfig
from invasive_dist.data import LoaderSpec, Shard, build_loader
from invasive_dist.data.kaggle import split, train_index


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path, help="a data root in the Kaggle layout (invasive-dist synth)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--eval-s", type=float, default=0.0, help="pause between epochs (an evaluation)")
    a = p.parse_args()

    d = DataConfig(root=str(a.data), image_size=a.size, batch_size=a.batch)
    d.torch.num_workers = a.workers
    index, _ = split(train_index(a.data, d.labels_csv), d.n_folds, 0, seed=0)  # the training folds
    spec = LoaderSpec.of(index, d, Shard(), torch.device("cpu"), True, seed=0, epochs=a.epochs)
    loader = build_loader(spec, d)
    print(f"{len(index)} images, batch {a.batch}, {loader.steps_per_epoch} steps/epoch, {a.workers} workers")
    rates, total = [], 0
    try:
        for epoch in range(a.epochs):
            waits, images = [], 0
            t_epoch = t = time.perf_counter()
            for batch in loader.iter_epoch(epoch):
                now = time.perf_counter()
                waits.append(now - t)
                images += batch.images.shape[0]
                total += batch.images.shape[0]
                t = now
            seconds = time.perf_counter() - t_epoch
            rates.append(images / seconds)
            print(
                f"epoch {epoch}: first batch {waits[0]:.2f} s, others median "
                f"{statistics.median(waits[1:]):.2f} s, {rates[-1]:.1f} img/s"
            )
            if a.eval_s and epoch + 1 < a.epochs:
                time.sleep(a.eval_s)
        # CPU seconds per image, which the machine's other load does not change much: the workers'
        # (the forkserver's children) and this process's (assembling and normalizing batches).
        me = psutil.Process()
        workers = [c for c in me.children(recursive=True) if c.pid != me.pid]
        cpu_workers = sum(sum(c.cpu_times()[:2]) for c in workers)
        cpu_main = sum(me.cpu_times()[:2])
        print(
            f"CPU per image: workers {1000 * cpu_workers / total:.0f} ms, "
            f"this process {1000 * cpu_main / total:.0f} ms"
        )
    finally:
        close = getattr(loader, "close", None)
        if close:
            close()
    if len(rates) > 1:
        print(f"epochs 1-{a.epochs - 1}: {statistics.mean(rates[1:]):.1f} img/s")


if __name__ == "__main__":
    main()

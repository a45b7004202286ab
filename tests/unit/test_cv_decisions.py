"""`cv` decides from the files once, on the main process, and every rank follows: on a shared
filesystem (NFS) one node can see a finished fold or current pseudo-labels that another does not
yet, and ranks that branch differently wait in each other's collectives until the timeout."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
from pathlib import Path

import pytest

from invasive_dist.config import load_config, save_config

TIMEOUT_S = 180  # two spawned processes import torch and start gloo on a loaded 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, root: str, queue) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )  # fmt: skip
    from invasive_dist import cv
    from invasive_dist.distributed import accelerator_from_env

    root = Path(root)
    cfg = load_config(
        None, [f"output.root={root}", "output.name=cv", "data.n_folds=2", f"data.root={root}/x"]
    )
    acc, world = accelerator_from_env(cfg)
    out = {}
    # The main process sees both folds and the pseudo-labels finished; rank 1 (a lagging NFS
    # client) sees nothing. Had rank 1 decided for itself it would start training fold 0 alone.
    cv.oof_is_fresh = lambda run_dir: rank == 0
    cv.pseudo_is_fresh = lambda path, rdir: rank == 0
    out["train_folds"] = [s.action for s in cv.train_folds(cfg, "cv", [0, 1], acc, world)]
    out["unfinished"] = cv.unfinished_folds(root / "cv", 2, acc)
    out["pseudo"] = str(cv.write_pseudo_labels(root / "cv", 1, root / "x", acc, 0.05, 0.95))
    # The other way round: the main process sees nothing finished, rank 1 sees everything.
    cv.oof_is_fresh = lambda run_dir: rank == 1
    out["unfinished_when_main_sees_none"] = cv.unfinished_folds(root / "cv", 2, acc)
    queue.put((rank, out))
    acc.wait_for_everyone()


@pytest.mark.slow
def test_every_rank_takes_the_main_process_decision(tmp_path):
    for k in range(2):  # the fold runs a skipped fold's config is compared with
        cfg = load_config(None, [f"output.root={tmp_path}", f"output.name=cv/fold{k}", "data.n_folds=2"])
        save_config(cfg, cfg.run_dir / "config.yaml")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, str(tmp_path), queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=TIMEOUT_S) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    expected = {
        "train_folds": ["skipped", "skipped"],
        "unfinished": [],
        "pseudo": str(tmp_path / "cv" / "pseudo_round1.csv"),
        "unfinished_when_main_sees_none": [0, 1],
    }
    assert results[0] == expected
    assert results[1] == expected

"""Process helpers shared by the multi-process tests (torchrun, accelerate launch, Slurm)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

_DROP_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "TORCHELASTIC_", "PET_", "ACCELERATE_")
_DROP_KEYS = {
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
}


def clean_env(fault: str | None = None, extra: dict | None = None) -> dict:
    """This environment without launcher, Slurm or fault variables (the tests may themselves run
    inside a Slurm job or under torchrun), one thread per process as torchrun would set, this
    interpreter's bin/ (torchrun, accelerate) first on PATH; plus ``fault`` and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROP_PREFIXES) and k not in _DROP_KEYS}
    env.pop("INVASIVE_DIST_FAULT", None)
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if fault:
        env["INVASIVE_DIST_FAULT"] = fault
    env.update(extra or {})
    return env


def write_init_weights(path: Path, arch: str = "resnet18", seed: int = 1) -> tuple[Path, dict]:
    """A fixed initial model as a ``model.weights`` file, so that 'how far training moved' is known."""
    import torch

    from invasive_dist.config import ModelConfig
    from invasive_dist.models import build_model

    torch.manual_seed(seed)
    state = build_model(ModelConfig(arch=arch)).state_dict()
    torch.save({"model": state}, path)
    return path, state


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and all its descendants (torchrun starts each worker in its own session)."""
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass

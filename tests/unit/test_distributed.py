import pytest

from invasive_dist.distributed import check_precision, world_info_from_env
from invasive_dist.errors import UserError


def test_plain_python():
    w = world_info_from_env({})
    assert (w.rank, w.world_size, w.launcher, w.is_main) == (0, 1, "python", True)


def test_torchrun_env():
    env = {
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "1",
        "TORCHELASTIC_RUN_ID": "x",
        "TORCHELASTIC_RESTART_COUNT": "2",
    }
    w = world_info_from_env(env)
    assert (w.rank, w.local_rank, w.world_size, w.node_rank, w.local_world_size) == (3, 1, 4, 1, 2)
    assert w.launcher == "torchrun" and w.restart_count == 2 and not w.is_main


def test_slurm_with_torchrun():
    env = {
        "RANK": "0",
        "WORLD_SIZE": "2",
        "TORCHELASTIC_RUN_ID": "7",
        "SLURM_JOB_ID": "42",
        "SLURM_RESTART_COUNT": "1",
    }
    w = world_info_from_env(env)
    assert w.launcher == "slurm" and w.slurm_job_id == "42" and w.slurm_restart_count == 1


def test_bad_env_is_user_error():
    with pytest.raises(UserError, match="RANK='x'"):
        world_info_from_env({"RANK": "x"})
    with pytest.raises(UserError, match="outside WORLD_SIZE"):
        world_info_from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(UserError, match="torchrun"):
        world_info_from_env({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "1"})


def test_fp16_on_cpu_fails_before_work():
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        check_precision("fp16", use_cuda=False)
    check_precision("bf16", use_cuda=False)

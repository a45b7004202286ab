import argparse
import os
import subprocess
import sys

import pytest
import torch

from invasive_dist.checkpoint import Checkpointer, atomic_torch_save, load_checkpoint
from invasive_dist.errors import UserError


def state(v: float) -> dict:
    return {"model": {"w": torch.full((4,), v)}, "global_step": int(v)}


def test_rotation_last_best(tmp_path):
    c = Checkpointer(tmp_path, keep_last=2)
    c.save(state(1), 1, is_best=True)
    c.save(state(2), 2)
    c.save(state(3), 3)
    assert [p.name for p in c.step_files()] == ["step-00000002.pt", "step-00000003.pt"]
    assert load_checkpoint(c.last)["global_step"] == 3
    assert load_checkpoint(c.best)["global_step"] == 1  # survives rotation of its step file
    assert c.load("auto")["global_step"] == 3
    assert c.load("") is None


def test_auto_without_checkpoint_is_none(tmp_path):
    assert Checkpointer(tmp_path / "none").load("auto") is None


def test_weights_only_refuses_arbitrary_objects(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"x": argparse.Namespace(code="arbitrary object")}, p)
    with pytest.raises(UserError, match="cannot be loaded"):
        load_checkpoint(p)


def test_truncated_checkpoint_is_a_user_error(tmp_path):
    p = tmp_path / "t.pt"
    atomic_torch_save(state(1), p)
    p.write_bytes(p.read_bytes()[:50])
    with pytest.raises(UserError, match=str(p)):
        load_checkpoint(p)


def test_crash_during_write_keeps_previous(tmp_path):
    """A process killed in the middle of torch.save leaves last.pt loadable and unchanged."""
    c = Checkpointer(tmp_path, keep_last=2)
    c.save(state(1), 1)
    code = f"""
import os, torch
import invasive_dist.checkpoint as ck
real_save = torch.save
def dying_save(obj, f):
    f.write(b"PK\\x03\\x04partial")
    f.flush()
    os._exit(9)
torch.save = dying_save
ck.Checkpointer({str(tmp_path)!r}).save({{"model": {{}}, "global_step": 2}}, 2)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert r.returncode == 9
    assert any(p.name.startswith(".") for p in tmp_path.iterdir())  # the partial temp file
    assert c.load("auto")["global_step"] == 1
    assert [p.name for p in c.step_files()] == ["step-00000001.pt"]
    c.save(state(3), 3)  # the next save cleans the partial file
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert os.path.samefile(c.last, tmp_path / "step-00000003.pt")


def test_fresh_run_refuses_a_folder_with_a_run(tmp_path):
    from invasive_dist.checkpoint import mixed_run_problem, refuse_mixed_run

    run = tmp_path / "demo"
    assert mixed_run_problem(run, "") == ""  # nothing there yet
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")  # a run that died before its first step
    assert mixed_run_problem(run, "") == ""
    Checkpointer(run / "checkpoints").save(state(1), 1)
    (run / "demo-2").mkdir()  # the suggested name is one that does not exist
    (tmp_path / "demo-2").mkdir()
    msg = mixed_run_problem(run, "")
    assert "checkpoints/last.pt" in msg and "resume=auto" in msg and "output.name=demo-3" in msg
    assert mixed_run_problem(run, "auto") == ""
    with pytest.raises(UserError, match="already holds a run"):
        refuse_mixed_run(run, "")

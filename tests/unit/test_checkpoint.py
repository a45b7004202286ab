import argparse
import os
import subprocess
import sys

import pytest
import torch

from invasive_dist.checkpoint import Checkpointer, FencedOut, atomic_torch_save, load_checkpoint, weights_only
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


def damage(path) -> None:
    """Cut the file short in place, as a full disk or an interrupted copy would (a hard link to it,
    such as last.pt, sees the same bytes)."""
    with open(path, "r+b") as f:
        f.truncate(64)


def test_auto_skips_a_damaged_newest_checkpoint_and_says_which(tmp_path, capsys):
    """Issue 20: the newest step file (and last.pt, its hard link) damaged, an older intact one kept:
    resume=auto continues from the older one and names what it skipped and why."""
    c = Checkpointer(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        c.save(state(step), step)
    damage(tmp_path / "step-00000003.pt")
    path, loaded = c.load_resume("auto")
    assert path == tmp_path / "step-00000002.pt" and loaded["global_step"] == 2
    err = capsys.readouterr().err
    assert f"skipping {c.last} (= step-00000003.pt): it cannot be loaded" in err
    assert err.count("skipping") == 1  # last.pt and its step file are one file: named once
    assert f"continuing from {path}, the newest intact checkpoint" in err
    assert c.load_resume("auto", quiet=True)[0] == path and capsys.readouterr().err == ""  # other ranks


def test_no_intact_checkpoint_is_an_error_naming_each(tmp_path):
    c = Checkpointer(tmp_path, keep_last=2)
    for step in (1, 2):
        c.save(state(step), step)
    for p in c.step_files():
        damage(p)
    with pytest.raises(UserError) as e:
        c.load_resume("auto", quiet=True)
    msg = str(e.value)
    assert "no checkpoint in" in msg and "step-00000001.pt" in msg and "step-00000002.pt" in msg


def test_a_damaged_named_checkpoint_points_at_auto_not_at_deleting(tmp_path):
    """The old advice, "delete it to fall back", was wrong while last.pt is a hard link to the file."""
    c = Checkpointer(tmp_path)
    c.save(state(1), 1)
    damage(c.last)
    with pytest.raises(UserError) as e:
        c.load_resume(str(c.last))
    assert "delete it" not in str(e.value) and "resume=auto" in str(e.value)


def test_best_weights_hold_only_the_chosen_weights_and_rebuild_the_model(tmp_path):
    """Issue 24: a weights-only file of the best model, much smaller than a step file with optimizer
    state, that model.weights (and predict) can load."""
    from invasive_dist.config import ModelConfig
    from invasive_dist.models import build_model

    torch.manual_seed(0)
    model, ema = build_model(ModelConfig(arch="resnet18")), build_model(ModelConfig(arch="resnet18"))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(2, 3, 32, 32)).sum().backward()
    opt.step()  # AdamW state: two moments per parameter
    full = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict()}
    full |= {"global_step": 7, "epoch": 1, "best_auc": 0.9, "config": {"model": {"arch": "resnet18"}}}
    c = Checkpointer(tmp_path / "checkpoints")
    c.save(full, 7, is_best=True)
    w = load_checkpoint(c.best_weights)
    assert set(w) == {"model", "weights", "config", "epoch", "global_step", "best_auc"}
    assert w["weights"] == "ema" and w["global_step"] == 7
    step_size, weights_size = c.step_files()[-1].stat().st_size, c.best_weights.stat().st_size
    assert weights_size < step_size / 3  # model + EMA + 2 AdamW moments vs one set of weights
    rebuilt = build_model(ModelConfig(arch="resnet18", weights=str(c.best_weights)))
    for k, v in rebuilt.state_dict().items():
        assert torch.equal(v, ema.state_dict()[k]), k  # the EMA weights, as predict uses them
    # A finished run trimmed to its best weights still predicts with the same model.
    from invasive_dist.config import Config
    from invasive_dist.predict import load_model_for_inference

    for p in [c.best, c.last, *c.step_files()]:
        p.unlink()
    kept = load_model_for_inference(Config(model=ModelConfig(arch="resnet18")), tmp_path, "best")
    for k, v in kept.state_dict().items():
        assert torch.equal(v, ema.state_dict()[k]), k


def test_resume_auto_refuses_another_runs_folder_without_a_checkpoint(tmp_path):
    """Issue 24 item 3: a resnet34 run that died before its first checkpoint, then resume=auto with
    resnet18: refused by name; a fresh run is not offered resume=auto (there is nothing to continue);
    the same settings (a longer run) may start again there."""
    from invasive_dist.checkpoint import mixed_run_problem
    from invasive_dist.config import load_config, save_config

    run = tmp_path / "demo"
    save_config(load_config(None, ["model.arch=resnet34"]), run / "config.yaml")
    (run / "metrics.jsonl").write_text('{"step": 10, "epoch": 1, "train/loss": 0.7}\n')
    fresh = mixed_run_problem(run, "")
    assert "already holds a run" in fresh and "resume=auto" not in fresh
    assert "no checkpoint to continue" in fresh and "output.name=demo-2" in fresh
    other = mixed_run_problem(run, "auto", load_config(None, ["model.arch=resnet18", "optim.lr=0.01"]))
    assert (
        "model.arch=resnet18 (the run has resnet34)" in other and "optim.lr=0.01 (the run has 0.1)" in other
    )
    same = load_config(
        None, ["model.arch=resnet34", "train.epochs=9", "dist.timeout_s=60", "data.backend=auto"]
    )
    assert mixed_run_problem(run, "auto", same) == ""


def test_best_weights_are_the_weights_that_validated_better():
    """best_weights.pt holds what predict would score from best.pt: the raw weights when they
    beat the EMA (``eval_weights``), the EMA in checkpoints older than that key."""
    raw, ema = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
    assert weights_only({"model": raw, "ema": ema, "eval_weights": "model"})["model"] is raw
    assert weights_only({"model": raw, "ema": ema, "eval_weights": "ema"})["model"] is ema
    assert weights_only({"model": raw, "ema": ema})["model"] is ema
    assert weights_only({"model": raw, "ema": None})["weights"] == "model"


def _state(step: int) -> dict:
    return {"step": step, "w": torch.full((2,), float(step))}


def test_an_attempt_that_lost_the_folder_never_replaces_the_new_owners_files(tmp_path):
    """A host frozen for longer than dist.timeout_s thaws after the survivors continued the run
    (resume=auto, a new attempt): its main process must not rename its checkpoint into place."""
    old = Checkpointer(tmp_path / "checkpoints")
    old.claim()
    old.save(_state(4), 4)
    new = Checkpointer(tmp_path / "checkpoints")  # the continuing attempt, on another host
    new.claim()
    new.save(_state(6), 6)
    with pytest.raises(FencedOut, match="another attempt .*pid"):
        old.save(_state(5), 5)
    assert load_checkpoint(new.last)["step"] == 6
    assert not (tmp_path / "checkpoints" / "step-00000005.pt").exists()
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp left


def test_a_takeover_during_the_write_cancels_the_rename(tmp_path, monkeypatch):
    """The window the fence closes: frozen after the write started, thawed after the takeover."""
    import invasive_dist.checkpoint as ck

    old = Checkpointer(tmp_path / "checkpoints")
    old.claim()
    old.save(_state(4), 4)
    new = Checkpointer(tmp_path / "checkpoints")
    real = ck._torch_save

    def frozen_mid_write(obj, tmp):
        real(obj, tmp)
        if obj["step"] == 5:  # the old attempt, stopped here; meanwhile the new one takes over
            new.claim()
            new.save(_state(6), 6)

    monkeypatch.setattr(ck, "_torch_save", frozen_mid_write)
    with pytest.raises(FencedOut):
        old.save(_state(5), 5)
    assert load_checkpoint(new.last)["step"] == 6
    assert not (tmp_path / "checkpoints" / "step-00000005.pt").exists()


def test_an_unclaimed_checkpointer_saves_as_before(tmp_path):
    ckpt = Checkpointer(tmp_path / "c")
    ckpt.save(_state(1), 1)
    assert load_checkpoint(ckpt.last)["step"] == 1 and not ckpt.owner_file.exists()


def test_ctrl_c_during_a_save_takes_effect_after_it(tmp_path):
    """A KeyboardInterrupt inside torch.save broke its zip writer (a traceback, exit 1, no file):
    the interrupt now waits for the save, which is complete and loads. In a fresh process: after
    the ~700 tests before it in one CI process, the signal did not reach the handler in time."""
    import subprocess
    import sys

    script = (
        "import os, signal, sys, torch\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job ignores SIGINT\n"
        "import invasive_dist.checkpoint as ck\n"
        "real = ck._torch_save\n"
        "def interrupted(obj, tmp):\n"
        "    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C lands in the middle of the write\n"
        "    real(obj, tmp)\n"
        "ck._torch_save = interrupted\n"
        f"c = ck.Checkpointer({str(tmp_path / 'c')!r})\n"
        "try:\n"
        "    c.save({'step': 3, 'w': torch.ones(4)}, 3)\n"
        "except KeyboardInterrupt:\n"
        "    assert ck.load_checkpoint(c.last)['step'] == 3\n"
        "    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler\n"
        "    sys.exit(130)\n"
        "sys.exit(5)  # the interrupt was lost\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, (proc.returncode, proc.stderr[-3000:])

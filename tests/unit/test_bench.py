"""``invasive-dist bench`` on CPU with tiny settings: bench.json holds the three figures per backend,
the ratio and the bound, and the figures are consistent with each other."""

from __future__ import annotations

import json

import pytest
import torch

from invasive_dist import bench
from invasive_dist.cli import main
from invasive_dist.config import load_config
from invasive_dist.errors import UserError

from ..conftest import FAST_TRAIN

# e2e can exceed neither ceiling: input and model each run alone at least as fast as in the loop.
# But the three windows (2-3 s each here) are measured one after the other, and on this 2-core VM
# identical windows differ a lot: at a load average of 7 from other processes, twelve identical
# 8-step windows gave 5.8 to 9.2 img/s by the wall clock and 22.6 to 28.6 img/s by the process's
# CPU time; near idle, successive runs gave e2e/min between 0.83 and 1.34 by either clock (vCPU
# steal and allocator state, not only other processes). So the check allows 50% by CPU time (the
# steadier clock under load) and 100% by the wall clock (the figures bench prints), and a run that
# breaks either is repeated once: a systematic error (images counted twice, the data time left out
# of the e2e window) breaks them on every run, a burst of foreign load rarely twice.
NOISE_CPU = 1.5
NOISE_WALL = 2.0


def _bench(
    tiny_data,
    tmp_path,
    *backends: str,
    steps: int = 8,
    warmup: int = 2,
    extra: list[str] = (),
    options: list[str] = (),
) -> tuple[int, dict]:
    argv = ["--steps", str(steps), "--warmup", str(warmup), "--out", str(tmp_path), *options]
    for b in backends:
        argv += ["--backend", b]
    argv += [*FAST_TRAIN, f"data.root={tiny_data}", f"output.root={tmp_path}", *extra]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two spin-waiting OpenMP threads on 2 shared cores: 10x slower, noisier
    try:
        rc = main(["bench", *argv])
    finally:
        torch.set_num_threads(threads)
    return rc, json.loads((tmp_path / "bench.json").read_text())


def _cpu_rate(window: dict) -> float:
    return window["images"] / window["cpu_seconds"]


def _above_ceilings(result: dict) -> list[str]:
    """Rows whose e2e exceeds a ceiling by more than the noise allowance (see NOISE_CPU)."""
    bad = []
    for r in result["rows"]:
        wall = r["e2e_img_per_s"] / min(r["input_img_per_s"], r["model_img_per_s"])
        cpu = _cpu_rate(r["e2e"]) / min(_cpu_rate(r["input"]), _cpu_rate(result["model"]))
        if wall > NOISE_WALL or cpu > NOISE_CPU:
            bad.append(f"{r['backend']}: e2e / min = {wall:.2f} (wall clock), {cpu:.2f} (CPU time)")
    return bad


def test_bench_cpu_writes_consistent_figures(tiny_data, tmp_path, capsys):
    rc, result = _bench(tiny_data, tmp_path / "1", "torch", "synthetic")
    if rc == 0 and _above_ceilings(result):  # see NOISE_CPU
        print("repeating bench:", _above_ceilings(result))
        rc, result = _bench(tiny_data, tmp_path / "2", "torch", "synthetic")
    assert rc == 0
    assert not _above_ceilings(result)

    s, hw = result["settings"], result["hardware"]
    assert (s["arch"], s["image_size"], s["batch_size"], s["steps"], s["warmup"]) == ("resnet18", 64, 8, 8, 2)
    assert s["compile"] is False and s["mixed_precision"] == "no" and s["train_images"] == 48
    assert hw["cpu"] and hw["cpu_cores"] >= 1 and hw["torch"] == torch.__version__ and hw["gpu"] is None

    rows = {r["backend"]: r for r in result["rows"]}
    assert list(rows) == ["torch", "synthetic"]
    model = result["model_img_per_s"]
    for r in rows.values():
        assert r["error"] is None
        assert r["input_img_per_s"] > 0 and r["e2e_img_per_s"] > 0
        assert r["model_img_per_s"] == model  # measured once, shared by the rows
        ceiling = min(r["input_img_per_s"], model)
        assert r["e2e_over_min"] == pytest.approx(r["e2e_img_per_s"] / ceiling)
        assert r["bound"] == ("input" if r["input_img_per_s"] < model else "model")
        assert r["serial_img_per_s"] < ceiling
        assert r["input"]["images"] == r["e2e"]["images"] == 8 * 8  # steps x batch
    # Tensors made once on the CPU cost nothing to hand out; ResNet-18 does.
    assert rows["synthetic"]["input_img_per_s"] > 10 * model
    assert rows["synthetic"]["bound"] == "model"

    out = capsys.readouterr().out
    assert "e2e/min" in out and "model (training step)" in out and str(tmp_path) in out


def test_bench_reports_a_failing_backend_and_measures_the_others(tiny_data, tmp_path, monkeypatch, capsys):
    real = bench.build_loader

    def build_loader(spec, data):
        if data.backend == "gpu_cache":
            raise RuntimeError("no decoder for you")
        return real(spec, data)

    monkeypatch.setattr(bench, "build_loader", build_loader)
    # Three windows of >= 2 steps and >= 0.05 s: the GPU check's layout, small.
    options = ["--windows", "3", "--window-s", "0.05"]
    rc, result = _bench(tiny_data, tmp_path, "gpu_cache", "synthetic", steps=2, warmup=1, options=options)
    assert rc == 1 and result["failed"] == 1
    failed, ok = result["rows"]
    assert failed["backend"] == "gpu_cache" and "no decoder for you" in failed["error"]
    assert ok["error"] is None and ok["e2e_img_per_s"] > 0

    s = result["settings"]
    assert (s["windows"], s["window_s"], s["backends"]) == (3, 0.05, ["gpu_cache", "synthetic"])
    assert result["finished"] is True and result["date"]
    for figure in (result["model"], ok["input"], ok["e2e"]):
        windows = figure["windows"]
        assert len(windows) == 3
        assert all(
            w["steps"] >= 2 and w["seconds"] >= 0.05 and w["images"] == 8 * w["steps"] for w in windows
        )
        rates = sorted(w["img_per_s"] for w in windows)
        assert figure["img_per_s"] == rates[1]  # the median
        assert figure["spread"] == pytest.approx((rates[2] - rates[0]) / rates[1])
        assert figure["images"] == sum(w["images"] for w in windows)
    # No device allocator on CPU: the peak is None, not 0.
    assert result["model"]["peak_mem_bytes"] is None and ok["peak_mem_bytes"] is None
    assert ok["seconds"] >= ok["input"]["seconds"] + ok["e2e"]["seconds"]

    # The table at the end has the failing row and the measured one.
    out = capsys.readouterr().out
    assert "FAILED: RuntimeError: no decoder for you" in out
    assert _table_row(out, "synthetic")[3] == f"{ok['input_img_per_s']:,.0f}"

    # --summary: this run, a copy cut short before its rows, and a folder without bench.json.
    cut = tmp_path / "cut"
    cut.mkdir()
    partial = {**result, "rows": [], "finished": False}
    del partial["failed"]
    (cut / "bench.json").write_text(json.dumps(partial))
    assert main(["bench", "--summary", str(tmp_path), str(cut), str(tmp_path / "never")]) == 0
    out = capsys.readouterr().out
    assert "NO GPU" in out and "STOPPED before its end" in out
    assert len([line for line in out.splitlines() if "(model alone)" in line]) == 2
    assert out.count("not reached: the run stopped before this row") == 2  # cut's two backends
    assert "never" in out and "no bench.json" in out
    assert _table_row(out, "synthetic")[3] == f"{ok['input_img_per_s']:,.0f}"


def _table_row(out: str, backend: str) -> list[str]:
    """The first table row of ``backend``: [arch, mode, backend, input, model, e2e, e2e/min, ...]."""
    return next(line.split() for line in out.splitlines() if line.split()[2:3] == [backend])


def test_bench_time_limit_skips_rows_and_says_so(tiny_data, tmp_path, capsys):
    # A limit already spent after the model's figure: the row is not started, and says why.
    rc, result = _bench(
        tiny_data, tmp_path, "synthetic", steps=1, warmup=0, options=["--time-limit-s", "0.001"]
    )
    assert rc == 0 and result["failed"] == 0 and result["model_img_per_s"] > 0
    (row,) = result["rows"]
    assert row["skipped"] is True and row["error"].startswith("not run:")
    assert "not run:" in capsys.readouterr().out


def test_timed_windows():
    figure = bench.timed(lambda: 4, 1, 2, torch.device("cpu"), windows=3)
    assert [w["steps"] for w in figure["windows"]] == [2, 2, 2]
    assert (figure["steps"], figure["images"]) == (6, 24)
    assert (
        figure["spread"] >= 0 and figure["img_per_s"] == sorted(w["img_per_s"] for w in figure["windows"])[1]
    )


def test_summary_user_errors(tmp_path, capsys):
    assert main(["bench", "--summary", str(tmp_path / "nothing")]) == 2
    assert "no bench.json" in capsys.readouterr().err
    assert main(["bench", "--summary", str(tmp_path), "--backend", "torch"]) == 2
    assert "takes no --backend" in capsys.readouterr().err


def test_backend_spec_carries_data_settings():
    cfg = load_config(None, ["data.dali.hw_decoder_load=0.65"])
    # Keys of the backend's own section, or full data.* paths.
    name, bcfg = bench.parse_backend(
        "dali:hw_decoder_load=1.0,data.dali.threads=8,data.eval_batch_size=4", cfg
    )
    assert name == "dali" and bcfg.data.backend == "dali"
    assert (bcfg.data.dali.hw_decoder_load, bcfg.data.dali.threads, bcfg.data.eval_batch_size) == (1.0, 8, 4)
    assert cfg.data.dali.hw_decoder_load == 0.65  # the run's config is left alone
    _, tcfg = bench.parse_backend("torch:num_workers=5", cfg)
    assert tcfg.data.torch.num_workers == 5 and tcfg.data.dali.hw_decoder_load == 0.65
    with pytest.raises(UserError, match="data.dali.hw_decoder_lod"):
        bench.parse_backend("dali:hw_decoder_lod=1.0", cfg)
    with pytest.raises(UserError, match="not one of"):
        bench.parse_backend("pil", cfg)


def test_verdict_with_the_h100_figures():
    # torch DataLoader (315 img/s) feeding ResNet-50 eager (3,975 img/s): input-bound.
    v = bench.verdict(315.0, 3975.0, 310.0)
    assert v["bound"] == "input" and v["e2e_over_min"] == pytest.approx(310 / 315)
    assert v["serial_img_per_s"] == pytest.approx(1 / (1 / 315 + 1 / 3975))
    assert bench.verdict(5238.0, 3975.0, 2862.0)["bound"] == "model"


def test_bench_config_error_is_a_user_error(tiny_data, tmp_path, capsys):
    assert main(["bench", "--backend", "pil", f"data.root={tiny_data}", f"output.root={tmp_path}"]) == 2
    assert "'pil' is not one of" in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


@pytest.mark.parametrize("train", [True, False])
def test_synthetic_epoch_plan_goes_to_cuda_pinned_and_without_blocking(tiny_data, monkeypatch, train):
    """At each epoch start the synthetic backend copies the epoch's plan to the device: on CUDA a
    pageable copy would make the host wait for every queued step. No GPU here, so the copy calls are
    recorded instead of run (tests/gpu/test_gpu_backends.py runs them under CUDA's sync checks)."""
    from invasive_dist.config import DataConfig
    from invasive_dist.data.kaggle import train_index
    from invasive_dist.data.torch_backend import TorchConfig

    from ..loaders import make_loader

    # num_workers=0: the synthetic backend has no DataLoader.
    d = DataConfig(image_size=32, batch_size=8, torch=TorchConfig(num_workers=0))
    loader = make_loader("synthetic", train_index(tiny_data, limit=20), d, train=train)
    cpu = [b.index for b in loader.iter_epoch(1)]  # the CPU path: plain tensors, no pinning
    loader.device = torch.device("cuda", 0)  # the CUDA path from here on, its copies recorded
    copies = []
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and isinstance(args[0], torch.device) and args[0].type == "cuda":
            copies.append(("to cuda", kwargs.get("non_blocking", False)))
            return self
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: (copies.append("pinned"), self)[1])
    monkeypatch.setattr(torch.Tensor, "to", to)
    cuda = [b.index for b in loader.iter_epoch(1)]
    assert copies == ["pinned", ("to cuda", True)]  # one pinned, non-blocking copy per epoch
    assert len(cpu) == len(cuda) == loader.steps_per_epoch
    assert all(torch.equal(a, b) for a, b in zip(cpu, cuda))

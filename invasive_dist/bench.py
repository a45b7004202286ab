"""``invasive-dist bench``: is the training loop bound by the input pipeline or by the model?

    invasive-dist bench --config configs/bench_r50.yaml --backend torch --backend dali
    python -m invasive_dist bench --config configs/bench_r50.yaml --backend gpu_cache    # the same
    invasive-dist bench --config configs/bench_r50.yaml --backend dali \\
        --backend dali:hw_decoder_load=0.65 train.compile=true --out runs/bench-compiled

In one process, on one device, with the config's model, resolution, batch, precision, memory format,
``train.compile`` and data, it measures three rates in images per second on this device:

    input   the loader alone: batches drawn across epochs, images on the device, nothing else done
    model   ``Trainer.train_step`` fed from a pool of batches already on the device (no input cost)
    e2e     ``Trainer.train_step`` fed by the loader, as in training

Each is measured after ``--warmup`` steps (compilation, worker start-up, cuDNN/autotuning happen
there) over ``--steps`` steps, between two device syncs and with none in between, like the training
loop. The loop can beat neither ceiling, so ``e2e <= min(input, model)`` up to noise, and the smaller
ceiling is what bounds it. ``e2e / min`` says how well the two overlap: near 1 they run concurrently
(input on CPU workers or the GPU's JPEG engines while the SMs train); near ``serial / min`` (see
``serial_img_per_s`` = 1 / (1/input + 1/model)) they take turns, e.g. when decoding and training
share the same CPU cores, as on a CPU-only machine.

``--backend`` may be given several times (one row each; ``model`` is measured once). A backend may
carry settings of its own section: ``dali:hw_decoder_load=1.0,threads=8`` sets ``data.dali.*``
(``torch:num_workers=8``: ``data.torch.*``); a key starting with ``data.`` is a full path. A backend
that fails gets a row with its error and the others still run; the exit status is then 1.
Results, settings and a hardware description go to ``bench.json`` in ``--out`` (default: the run
directory, ``output.root/output.name``), rewritten after every row.

What this code has measured, on which device and with which command, is in docs/performance.md
(tests/gpu_check.sh produces the GPU rows).
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torchvision

from .build import loader_spec
from .config import Config, load_config, parse_override, with_keys
from .data import BACKENDS, Batch, build_loader, dali_version, resolve_backend
from .data.transforms import image_hw
from .distributed import build_accelerator, usable_cores, world_info_from_env
from .errors import UserError
from .files import write_json
from .train import Trainer, build_parts


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], int], warmup: int, steps: int, device: torch.device) -> dict:
    """Run ``step`` (returns the images it processed) ``warmup`` times, then ``steps`` times between
    two device syncs; the window holds no other sync, so queued device work is counted once."""
    for _ in range(warmup):
        step()
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    images = 0
    for _ in range(steps):
        images += step()
    _sync(device)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    return {
        "img_per_s": images / max(seconds, 1e-9),
        "seconds": seconds,
        "steps": steps,
        "images": images,
        # CPU time of this process (all its threads; not DataLoader worker processes). Over
        # seconds, it is the number of cores the process kept busy: about 1.0 on a GPU in a
        # model-bound window means the Python thread launching kernels is the limit.
        "cpu_seconds": cpu_seconds,
    }


def endless(loader) -> Iterator[Batch]:
    """The loader's training batches epoch after epoch, as the training loop draws them (epoch
    boundaries included: DataLoader workers restart and DALI pipelines are rebuilt there)."""
    epoch = 0
    while True:
        n = 0
        for batch in loader.iter_epoch(epoch):
            n += 1
            yield batch
        if n == 0:
            raise UserError("the loader yielded no batch in an epoch: is the training split empty?")
        epoch += 1


def batch_pool(
    n: int, batch: int, size: int | Sequence[int], device: torch.device, channels_last: bool
) -> list[Batch]:
    """Batches as a loader yields them (float32 normalized images in the model's memory format,
    0/1 labels, indices), made on the device once; ``size`` one side or (height, width)."""
    h, w = image_hw(size)
    g = torch.Generator(device="cpu").manual_seed(0)
    pool = []
    for _ in range(n):
        images = torch.randn(batch, 3, h, w, generator=g).to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, 2, (batch,), generator=g).float().to(device)
        pool.append(Batch(images=images, labels=labels, index=torch.arange(batch, device=device)))
    return pool


# ----------------------------------------------------------------------------------------------
# Backend specs: "name" or "name:key=value,key=value" with data.* keys.


def size_label(image_size: int | Sequence[int]) -> str:
    """``224px`` for a square input, ``336x448px`` (height x width) for [336, 448]."""
    h, w = image_hw(image_size)
    return f"{h}px" if h == w else f"{h}x{w}px"


def parse_backend(spec: str, cfg: Config) -> tuple[str, Config]:
    """``"dali:hw_decoder_load=1.0"`` -> ("dali", cfg with data.backend=dali and
    data.dali.hw_decoder_load=1.0). Keys are the backend's own section's, or full ``data.*`` paths."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if name not in ("auto", *BACKENDS):
        raise UserError(f"--backend {spec!r}: {name!r} is not one of auto, {', '.join(BACKENDS)}")
    section = BACKENDS[resolve_backend(name) if name == "auto" else name].section
    values: dict = {"data.backend": name}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, value = parse_override(item)
        if not key.startswith("data."):
            key = f"data.{section}.{key}" if section else f"data.{key}"
        values[key] = value
    try:
        return name, with_keys(cfg, values, f"--backend {spec!r}")
    except UserError as e:
        raise UserError(
            f"{e} (backend settings are keys of its section, e.g. dali:hw_decoder_load=1.0, or data.* paths)"
        ) from None


# ----------------------------------------------------------------------------------------------
# Hardware description.


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_driver() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def hardware(device: torch.device) -> dict:
    """CPU, GPU and library versions: what a figure was measured on."""
    dali = dali_version()
    info = {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable_cores(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "dali": dali,
        "device": str(device),
        "gpu": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_bytes=int(props.total_memory),
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_count=torch.cuda.device_count(),
            gpu_driver=_gpu_driver(),
        )
    return info


def describe_device(hw: dict) -> str:
    if hw.get("gpu"):
        return f"{hw['gpu']} ({hw['gpu_memory_bytes'] / 2**30:.0f} GiB)"
    return f"CPU: {hw['cpu']} ({hw['cpu_cores_usable']} cores)"


# ----------------------------------------------------------------------------------------------


def verdict(input_rate: float, model_rate: float, e2e: float) -> dict:
    """The bound (the smaller ceiling), e2e as a fraction of it, and the no-overlap reference."""
    ceiling = min(input_rate, model_rate)
    return {
        "bound": "input" if input_rate < model_rate else "model",
        "e2e_over_min": e2e / ceiling,
        # If input and model took turns instead of overlapping, each image would cost both times.
        "serial_img_per_s": 1.0 / (1.0 / input_rate + 1.0 / model_rate),
    }


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def format_table(result: dict) -> str:
    lines = [
        f"{'backend':<34} {'input':>9} {'model':>9} {'e2e':>9} {'e2e/min':>8}  bound (img/s on this device)"
    ]
    for r in result["rows"]:
        if r.get("error"):
            lines.append(f"{r['backend']:<34} {'FAILED':>9}  {r['error'][:200]}")
            continue
        note = "input pipeline" if r["bound"] == "input" else "model (training step)"
        if r["e2e_over_min"] < 0.8:
            note += f"; poor overlap (serial would be {_fmt(r['serial_img_per_s'])})"
        lines.append(
            f"{r['backend']:<34} {_fmt(r['input_img_per_s']):>9} {_fmt(r['model_img_per_s']):>9} "
            f"{_fmt(r['e2e_img_per_s']):>9} {r['e2e_over_min']:>8.2f}  {note}"
        )
    return "\n".join(lines)


def measure_model(trainer, warmup: int, steps: int) -> dict:
    """(b) ``trainer.train_step`` fed from a few batches made on the device once."""
    plan = trainer.plan
    pool = batch_pool(
        min(4, steps + warmup),
        plan.per_device,
        trainer.cfg.data.image_size,
        trainer.device,
        trainer.channels_last,
    )
    batches = itertools.cycle(pool)
    per_step = plan.per_device * plan.accum

    def step() -> int:
        trainer.train_step(lambda: next(batches))
        return per_step

    return timed(step, warmup, steps, trainer.device)


def measure_backend(trainer, cfg: Config, warmup: int, steps: int) -> dict:
    """(a) the loader of ``cfg.data.backend`` alone and (c) ``trainer.train_step`` fed by it."""
    device = trainer.device
    t0 = time.perf_counter()
    # No end of training: the loader is drawn across as many epochs as the measurement needs.
    spec = dataclasses.replace(
        loader_spec(cfg, trainer.acc, trainer.plan, trainer.train_idx, True), epochs=None
    )
    loader = build_loader(spec, cfg.data)
    setup_s = time.perf_counter() - t0
    per_step = trainer.plan.per_device * trainer.plan.accum
    build_info = getattr(loader, "build_info", None)  # gpu_cache: cache_build_s, cache_bytes, ...

    it = endless(loader)
    try:
        inp = timed(lambda: next(it).images.shape[0], warmup, steps, device)
    finally:
        it.close()  # stops DataLoader workers / DALI pipelines before the next measurement

    # A fresh iteration, as an epoch of training starts one: worker start-up falls in the warm-up.
    it2 = endless(loader)

    def step() -> int:
        trainer.train_step(lambda: next(it2))
        return per_step

    try:
        e2e = timed(step, warmup, steps, device)
    finally:
        it2.close()
    return {
        **(dict(build_info) if build_info else {}),
        "setup_s": setup_s,
        "input_img_per_s": inp["img_per_s"],
        "e2e_img_per_s": e2e["img_per_s"],
        "input": inp,
        "e2e": e2e,
    }


def run_bench(
    cfg: Config,
    backends: list[str] | None = None,
    steps: int = 30,
    warmup: int = 5,
    out_dir: Path | None = None,
    accelerator=None,
    log: Callable[[str], None] = print,
) -> dict:
    """Measure model once and (input, e2e) per backend; write and return the bench.json content."""
    if steps < 1 or warmup < 0:
        raise UserError(f"--steps={steps} must be >= 1 and --warmup={warmup} >= 0")
    world = world_info_from_env()
    if world.world_size > 1:
        raise UserError("bench measures one device in one process: run it with python, not torchrun")
    specs = backends or [cfg.data.backend]
    parsed = [parse_backend(s, cfg) for s in specs]  # config errors before any work
    out_path = Path(out_dir or cfg.run_dir) / "bench.json"

    # The model side is the Trainer's own train_step, built without loaders (nor a checkpoint to
    # resume): each benchmarked backend builds its own loader below.
    acc = accelerator or build_accelerator(cfg, world)
    parts = build_parts(dataclasses.replace(cfg, resume=""), acc, world, train_loader=False, val_loader=False)
    trainer = Trainer(cfg, acc, world, parts)
    trainer.model.train()
    device = trainer.device
    d, t = cfg.data, cfg.train
    hw = hardware(device)
    settings = {
        "arch": cfg.model.arch,
        "image_size": d.image_size,
        "batch_size": trainer.plan.per_device,
        "grad_accum": trainer.plan.accum,
        "mixed_precision": t.mixed_precision,
        "channels_last": trainer.channels_last,
        "compile": t.compile,
        "optimizer": cfg.optim.name,
        "data_root": d.root,
        "train_images": len(trainer.train_idx),
        "data_torch": dataclasses.asdict(d.torch),
        "data_dali": dataclasses.asdict(d.dali),
        "data_gpu_cache": dataclasses.asdict(d.gpu_cache),
        "steps": steps,
        "warmup": warmup,
        "world_size": 1,
    }
    result = {"settings": settings, "hardware": hw, "model_img_per_s": None, "rows": []}
    log(
        f"bench: {cfg.model.arch} {size_label(d.image_size)} batch {trainer.plan.per_device}x{trainer.plan.accum} "
        f"precision {t.mixed_precision} channels_last {trainer.channels_last} compile {t.compile} "
        f"on {describe_device(hw)}; {warmup} warm-up + {steps} measured steps each"
    )

    write_json(out_path, result)  # settings and hardware even if the first measurement never ends

    # (b) model: train_step on batches already on the device.
    model = measure_model(trainer, warmup, steps)
    result["model_img_per_s"] = model["img_per_s"]
    result["model"] = model
    log(f"  model (train_step on device-resident batches): {_fmt(model['img_per_s'])} img/s")
    write_json(out_path, result)

    failed = 0
    for spec, (name, bcfg) in zip(specs, parsed):
        row: dict = {"backend": spec}
        try:
            row["resolved"] = resolve_backend(name)
            row.update(measure_backend(trainer, bcfg, warmup, steps))
            row.update(
                model_img_per_s=model["img_per_s"],
                **verdict(row["input_img_per_s"], model["img_per_s"], row["e2e_img_per_s"]),
                error=None,
            )
            log(
                f"  {spec}: input {_fmt(row['input_img_per_s'])} img/s, e2e {_fmt(row['e2e_img_per_s'])} "
                f"img/s, e2e/min {row['e2e_over_min']:.2f}, bound: {row['bound']}"
            )
        except Exception as e:  # one backend failing must not hide the others' figures
            failed += 1
            first = (str(e).strip().splitlines() or [""])[0]
            row["error"] = f"{type(e).__name__}: {first}"
            log(f"  {spec}: FAILED: {row['error']}")
            if not isinstance(e, UserError):
                traceback.print_exc(file=sys.stderr)
        finally:
            gc.collect()  # the backend's loader, workers and device buffers go before the next one
            if device.type == "cuda":
                torch.cuda.empty_cache()
        result["rows"].append(row)
        write_json(out_path, result)
    result["failed"] = failed
    write_json(out_path, result)
    log(format_table(result))
    log(f"wrote {out_path}")
    return result


def cmd_bench(args) -> int:
    cfg = load_config(args.config, args.overrides)
    result = run_bench(cfg, args.backend, args.steps, args.warmup, Path(args.out) if args.out else None)
    return 1 if result["failed"] else 0

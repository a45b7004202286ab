"""``invasive-dist bench``: is the training loop bound by the input pipeline or by the model?

    invasive-dist bench --config configs/bench_r50.yaml --backend torch --backend dali
    python -m invasive_dist bench --config configs/bench_r50.yaml --backend gpu_cache    # the same
    invasive-dist bench --config configs/bench_r50.yaml --backend dali \\
        --backend dali:hw_decoder_load=0.65 train.compile=true --out runs/bench-compiled
    invasive-dist bench --config configs/bench_r50.yaml --backend dali --windows 3 --window-s 1.5 --steps 2
    invasive-dist bench --summary runs/bench-eager runs/bench-compiled   # one table of several runs

In one process, on one device, with the config's model, resolution, batch, precision, memory format,
``train.compile`` and data, it measures three rates in images per second on this device:

    input   the loader alone: batches drawn across epochs, images on the device, nothing else done
    model   ``Trainer.train_step`` fed from a pool of batches already on the device (no input cost)
    e2e     ``Trainer.train_step`` fed by the loader, as in training

Each is measured after ``--warmup`` steps (compilation, worker start-up, cuDNN/autotuning happen
there) in ``--windows`` windows (default 1) of at least ``--steps`` steps and ``--window-s``
seconds, each between two device syncs and with none in between, like the training loop; the
figure is the windows' median and ``spread`` = (max - min) / median says how steady they were. Per
row, ``peak_mem_bytes`` is the peak of torch's device allocator (reset before the row; DALI's own
buffers are not in it; None on CPU); gpu_cache's row also holds its cache's build time and bytes.
The loop can beat neither ceiling, so ``e2e <= min(input, model)`` up to noise, and the smaller
ceiling is what bounds it. ``e2e / min`` says how well the two overlap: near 1 they run concurrently
(input on CPU workers or the GPU's JPEG engines while the SMs train); near ``serial / min`` (see
``serial_img_per_s`` = 1 / (1/input + 1/model)) they take turns, e.g. when decoding and training
share the same CPU cores, as on a CPU-only machine.

``--backend`` may be given several times (one row each; ``model`` is measured once). A backend may
carry settings of its own section: ``dali:hw_decoder_load=1.0,threads=8`` sets ``data.dali.*``
(``torch:num_workers=8``: ``data.torch.*``); a key starting with ``data.`` is a full path. A backend
that fails gets a row with its error and the others still run; the exit status is then 1. With
``--time-limit-s``, a row that the time left is not expected to cover is not started and says so.

Results, settings and a hardware description go to ``bench.json`` in ``--out`` (default: the run
directory, ``output.root/output.name``), rewritten after every row, so a run cut short keeps what it
measured. Its layout (docs/observability.md has the same): ``date``, ``command``, ``settings`` (the
run's config figures, ``steps``/``warmup``/``windows``/``window_s``/``time_limit_s`` and the planned
``backends``), ``hardware``, ``model`` (a figure), ``model_img_per_s``, ``rows`` (per backend: ``backend``,
``resolved``, ``input`` and ``e2e`` (figures), ``input_img_per_s``, ``e2e_img_per_s``,
``model_img_per_s``, ``bound``, ``e2e_over_min``, ``serial_img_per_s``, ``peak_mem_bytes``,
``setup_s``, ``seconds``, gpu_cache's ``cache_*`` (``cache_decoder``: dali mixed, torchvision nvjpeg, ...), and ``error``: None, the failure, or with
``skipped`` why it was not run), ``failed`` and ``finished`` (false until the end). A figure:
``img_per_s`` (the median), ``spread``, the windows' summed ``seconds``/``steps``/``images``/
``cpu_seconds``, and ``windows`` (each window's own). The table printed at the end is
:func:`format_table`; ``--summary`` prints it for several runs' files, listing the rows a cut-short
run did not reach and the folders that hold no bench.json.

What this code has measured, on which device and with which command, is in docs/performance.md
(tests/gpu_check.sh produces the GPU rows: one bench run per model and compile mode, most valuable
first within a time budget, then --summary).
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import os
import platform
import statistics
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


def _reset_peak(device: torch.device) -> None:
    """Free what the previous measurement left (its loader, workers, device buffers) and restart
    the device allocator's peak, so that each row's ``peak_mem_bytes`` is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    """The peak of torch's device allocator since :func:`_reset_peak` (DALI's own buffers are not in
    it); None on CPU, where there is no such allocator to read."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def timed(
    step: Callable[[], int],
    warmup: int,
    steps: int,
    device: torch.device,
    windows: int = 1,
    window_s: float = 0.0,
) -> dict:
    """Run ``step`` (returns the images it processed) ``warmup`` times, then ``windows`` windows of
    at least ``steps`` steps and ``window_s`` seconds, each between two device syncs with no other
    sync inside, so queued device work is counted once. ``img_per_s`` is the median window's rate,
    ``spread`` = (max - min) / median of the windows' rates; ``seconds``, ``steps``, ``images`` and
    ``cpu_seconds`` are the windows' sums, and ``windows`` holds each window."""
    for _ in range(warmup):
        step()
    _sync(device)
    per_window = []
    for _ in range(windows):
        t0, c0 = time.perf_counter(), time.process_time()
        images = k = 0
        # The clock is read without a sync: on a GPU the host runs ahead by the queued steps, and
        # the closing sync waits for them, so a window lasts at least window_s.
        while k < steps or time.perf_counter() - t0 < window_s:
            images += step()
            k += 1
        _sync(device)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        per_window.append(
            {
                "img_per_s": images / max(seconds, 1e-9),
                "seconds": seconds,
                "steps": k,
                "images": images,
                # CPU time of this process (all its threads; not DataLoader worker processes). Over
                # seconds, it is the number of cores the process kept busy: about 1.0 on a GPU in a
                # model-bound window means the Python thread launching kernels is the limit.
                "cpu_seconds": cpu_seconds,
            }
        )
    rates = [w["img_per_s"] for w in per_window]
    median = statistics.median(rates)
    return {
        "img_per_s": median,
        "spread": (max(rates) - min(rates)) / max(median, 1e-9),
        **{key: sum(w[key] for w in per_window) for key in ("seconds", "steps", "images", "cpu_seconds")},
        "windows": per_window,
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


# ----------------------------------------------------------------------------------------------
# The table: one run's rows at its end, or several runs' bench.json files (--summary).


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _gib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**30:.1f}"


def run_label(result: dict) -> str:
    """``resnet50 eager`` / ``resnet50 compiled``: what tells the runs of a summary apart."""
    s = result["settings"]
    return f"{s['arch']} {'compiled' if s['compile'] else 'eager'}"


def _hardware_line(result: dict) -> str:
    hw = result["hardware"]
    if hw.get("gpu"):
        where = (
            f"{hw['gpu']} ({hw['gpu_memory_bytes'] / 2**30:.0f} GiB, driver {hw.get('gpu_driver') or '?'})"
        )
    else:
        where = f"NO GPU, CPU {hw['cpu']} ({hw['cpu_cores_usable']} cores)"
    return (
        f"on {where}; torch {hw['torch']} (CUDA {hw['cuda']}, cuDNN {hw['cudnn']}), "
        f"torchvision {hw['torchvision']}, DALI {hw['dali'] or '-'}"
    )


def _settings_line(result: dict) -> str:
    s = result["settings"]
    windows = s.get("windows", 1)
    how = f"median of {windows} windows" if windows > 1 else "1 window"
    if s.get("window_s"):
        how += f" of >= {s['window_s']:g} s and >= {s['steps']} steps"
    else:
        how += f" of {s['steps']} steps"
    line = (
        f"{run_label(result)}: {size_label(s['image_size'])} batch {s['batch_size']}x{s['grad_accum']} "
        f"{s['mixed_precision']} channels_last {s['channels_last']}, {s['train_images']:,} training images; "
        f"{how} after {s['warmup']} warm-up steps"
    )
    if not result.get("finished"):
        line += "; STOPPED before its end (rows it did not reach say so)"
    return line


_HEADER = (
    f"{'run':<18} {'backend':<32} {'input':>10} {'model':>8} {'e2e':>8} {'e2e/min':>7} {'spread':>6} "
    f"{'peak GiB':>8}  bound"
)


def _row_line(label: str, r: dict) -> str:
    lead = f"{label:<18} {r['backend']:<32}"
    if r.get("error"):
        what = r["error"] if r.get("skipped") else f"FAILED: {r['error']}"
        return f"{lead} {'-':>10}  {what[:160]}"
    spread = max(r["input"]["spread"], r["e2e"]["spread"])
    note = "input pipeline" if r["bound"] == "input" else "model (training step)"
    if r["e2e_over_min"] < 0.8:
        note += f"; poor overlap (serial would be {_fmt(r['serial_img_per_s'])})"
    if "cache_build_s" in r:
        note += f"; cache {r['cache_bytes'] / 2**30:.2f} GiB built in {r['cache_build_s']:.1f} s"
        if r.get("cache_decoder"):
            note += f" ({r['cache_decoder']})"
    return (
        f"{lead} {_fmt(r['input_img_per_s']):>10} {_fmt(r['model_img_per_s']):>8} "
        f"{_fmt(r['e2e_img_per_s']):>8} {r['e2e_over_min']:>7.2f} {spread:>6.1%} "
        f"{_gib(r.get('peak_mem_bytes')):>8}  {note}"
    )


def format_table(results: Sequence[dict]) -> str:
    """One screen for one or several bench runs (bench.json contents, complete or cut short; a
    ``{"missing": PATH}`` entry for a run that left none): the date and hardware, each run's
    settings, then per run its model row and one row per planned backend, with the ratio
    e2e / min(input, model), the windows' spread and the device memory peak."""
    lines = []
    hardware_lines = []
    for r in results:
        if "missing" not in r:
            line = f"{r.get('date', '?')} {_hardware_line(r)}"
            if line not in hardware_lines:
                hardware_lines.append(line)
    lines += hardware_lines
    lines += [_settings_line(r) for r in results if "missing" not in r]
    lines += ["", _HEADER]
    for r in results:
        if "missing" in r:
            lines.append(
                f"{Path(r['missing']).name:<18} {'-':<32} {'-':>10}  no bench.json: not run, or stopped before it began"
            )
            continue
        label = run_label(r)
        model = r.get("model")
        if model is None:
            lines.append(f"{label:<18} {'(model alone)':<32} {'-':>10}  not measured: the run stopped before")
        else:
            lines.append(
                f"{label:<18} {'(model alone)':<32} {'':>10} {_fmt(model['img_per_s']):>8} {'':>8} {'':>7} "
                f"{model['spread']:>6.1%} {_gib(model.get('peak_mem_bytes')):>8}  train_step on device batches"
            )
        done = {row["backend"]: row for row in r["rows"]}
        for spec in r["settings"].get("backends", list(done)):
            if spec in done:
                lines.append(_row_line(label, done[spec]))
            else:
                lines.append(
                    f"{label:<18} {spec:<32} {'-':>10}  not reached: the run stopped before this row"
                )
    lines.append(
        "img/s on one device; e2e/min = e2e / min(input, model); spread = (max - min) / median of the "
        "windows (the larger of input's and e2e's); peak = torch's device allocator (not DALI's buffers)"
    )
    return "\n".join(lines)


def read_results(paths: Sequence[str | Path]) -> list[dict]:
    """bench.json of each path (a file, or a folder holding one); ``{"missing": path}`` for a
    folder without one (a run that never started), so that the table still lists it."""
    results = []
    for p in map(Path, paths):
        f = p if p.suffix == ".json" else p / "bench.json"
        if not f.is_file():
            results.append({"missing": str(p)})
            continue
        try:
            results.append(json.loads(f.read_text()))
        except (OSError, ValueError) as e:
            raise UserError(f"{f}: not a bench.json ({e})") from None
    if all("missing" in r for r in results):
        raise UserError(f"--summary: no bench.json in {', '.join(map(str, paths))}")
    return results


# ----------------------------------------------------------------------------------------------
# The measurements.


def measure_model(trainer, warmup: int, steps: int, windows: int = 1, window_s: float = 0.0) -> dict:
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

    return timed(step, warmup, steps, trainer.device, windows, window_s)


def measure_backend(
    trainer, cfg: Config, warmup: int, steps: int, windows: int = 1, window_s: float = 0.0
) -> dict:
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
        inp = timed(lambda: next(it).images.shape[0], warmup, steps, device, windows, window_s)
    finally:
        it.close()  # stops DataLoader workers / DALI pipelines before the next measurement

    # A fresh iteration, as an epoch of training starts one: worker start-up falls in the warm-up.
    it2 = endless(loader)

    def step() -> int:
        trainer.train_step(lambda: next(it2))
        return per_step

    try:
        e2e = timed(step, warmup, steps, device, windows, window_s)
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


# A row is not started when less time is left than this or than the longest row so far took: the
# timeout that follows would kill it anyway, and the time saved goes to the next run of the GPU check.
MIN_ROW_S = 10.0


def run_bench(
    cfg: Config,
    backends: list[str] | None = None,
    steps: int = 30,
    warmup: int = 5,
    out_dir: Path | None = None,
    accelerator=None,
    log: Callable[[str], None] = print,
    windows: int = 1,
    window_s: float = 0.0,
    time_limit_s: float | None = None,
) -> dict:
    """Measure model once and (input, e2e) per backend; write and return the bench.json content."""
    start = time.monotonic()
    if steps < 1 or warmup < 0 or windows < 1 or window_s < 0:
        raise UserError(
            f"--steps={steps} and --windows={windows} must be >= 1, --warmup={warmup} and "
            f"--window-s={window_s} >= 0"
        )
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
        "windows": windows,
        "window_s": window_s,
        "time_limit_s": time_limit_s,
        "backends": specs,
        "world_size": 1,
    }
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": sys.argv,
        "settings": settings,
        "hardware": hw,
        "model_img_per_s": None,
        "rows": [],
        "finished": False,
    }
    how = f"{windows} windows of >= {window_s:g} s and " if window_s or windows > 1 else ""
    log(
        f"bench: {cfg.model.arch} {size_label(d.image_size)} batch {trainer.plan.per_device}x{trainer.plan.accum} "
        f"precision {t.mixed_precision} channels_last {trainer.channels_last} compile {t.compile} "
        f"on {describe_device(hw)}; {warmup} warm-up + {how}{steps} measured steps each"
    )

    write_json(out_path, result)  # settings and hardware even if the first measurement never ends

    # (b) model: train_step on batches already on the device.
    _reset_peak(device)
    model = measure_model(trainer, warmup, steps, windows, window_s)
    model["peak_mem_bytes"] = _peak(device)
    result["model_img_per_s"] = model["img_per_s"]
    result["model"] = model
    log(
        f"  model (train_step on device-resident batches): {_fmt(model['img_per_s'])} img/s"
        f" (spread {model['spread']:.1%}, peak {_gib(model['peak_mem_bytes'])} GiB)"
    )
    write_json(out_path, result)

    failed, longest = 0, 0.0
    for spec, (name, bcfg) in zip(specs, parsed):
        row: dict = {"backend": spec}
        left = None if time_limit_s is None else time_limit_s - (time.monotonic() - start)
        if left is not None and left < max(MIN_ROW_S, longest):
            row.update(
                error=f"not run: {max(left, 0):.0f} s of --time-limit-s {time_limit_s:g} left "
                f"(the longest row took {longest:.0f} s)",
                skipped=True,
            )
            log(f"  {spec}: {row['error']}")
            result["rows"].append(row)
            write_json(out_path, result)
            continue
        t0 = time.monotonic()
        _reset_peak(device)
        try:
            row["resolved"] = resolve_backend(name)
            row.update(measure_backend(trainer, bcfg, warmup, steps, windows, window_s))
            row.update(
                model_img_per_s=model["img_per_s"],
                **verdict(row["input_img_per_s"], model["img_per_s"], row["e2e_img_per_s"]),
                peak_mem_bytes=_peak(device),
                error=None,
            )
            log(
                f"  {spec}: input {_fmt(row['input_img_per_s'])} img/s, e2e {_fmt(row['e2e_img_per_s'])} "
                f"img/s, e2e/min {row['e2e_over_min']:.2f}, bound: {row['bound']}, "
                f"in {time.monotonic() - t0:.0f} s"
            )
        except Exception as e:  # one backend failing must not hide the others' figures
            failed += 1
            first = (str(e).strip().splitlines() or [""])[0]
            row["error"] = f"{type(e).__name__}: {first}"
            log(f"  {spec}: FAILED: {row['error']}")
            if not isinstance(e, UserError):
                traceback.print_exc(file=sys.stderr)
        finally:
            _reset_peak(device)  # the backend's loader, workers and device buffers go before the next one
        row["seconds"] = time.monotonic() - t0
        longest = max(longest, row["seconds"])
        result["rows"].append(row)
        write_json(out_path, result)
    result.update(failed=failed, finished=True)
    write_json(out_path, result)
    log(format_table([result]))
    log(f"wrote {out_path}")
    return result


def cmd_bench(args) -> int:
    if args.summary:
        if args.overrides or args.backend:
            raise UserError("--summary reads bench.json files: it takes no --backend nor overrides")
        print(format_table(read_results(args.summary)))
        return 0
    cfg = load_config(args.config, args.overrides)
    result = run_bench(
        cfg,
        args.backend,
        args.steps,
        args.warmup,
        Path(args.out) if args.out else None,
        windows=args.windows,
        window_s=args.window_s,
        time_limit_s=args.time_limit_s,
    )
    return 1 if result["failed"] else 0

"""The GPU check's measurements: per (model, eager/compiled) group, model alone and per backend input
alone and end to end, in repeated timed windows, with peak device memory; then one summary table.

    python tests/gpu/bench_rows.py --config configs/bench_r50.yaml --out OUT --budget-s 300
    python tests/gpu/bench_rows.py --summary OUT          # the table again, from OUT/bench.json

It measures what ``invasive-dist bench`` measures (``invasive_dist.bench``: the Trainer's own
``train_step`` fed from a pool of device batches for "model", the loader alone for "input", the
loader feeding ``train_step`` for "e2e"; no device sync inside a window) and adds what a short GPU
slot needs: each figure is the median of ``--windows`` windows of at least ``--window-s`` seconds
(and two steps) after ``--warmup`` steps, with the windows' spread, (max - min) / median; the peak
of torch's device allocator per row (DALI's own buffers are not in it); gpu_cache's build time and
bytes. Each group runs in its own process (one model, compiled at most once; a CUDA failure cannot
take the other groups with it) under a time limit taken from ``--budget-s``; a row that did not run
says why. Results: ``OUT/bench.json`` (all groups; each group in ``invasive-dist bench``'s layout:
settings, hardware, model_img_per_s, rows) and ``OUT/summary.txt``, rewritten after every row.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

# (arch, compile) groups in the order they run: the ResNet-50 rows the goals are held
# against first, ResNet-18 after them, so a short budget cuts the least needed ones.
GROUPS = [("resnet50", False), ("resnet50", True), ("resnet18", False), ("resnet18", True)]
BACKENDS = ["synthetic", "gpu_cache", "dali", "torch"]
MIN_GROUP_S = 40  # a group given less than this is reported as not run rather than started


def group_name(arch: str, compiled: bool) -> str:
    return f"{arch} {'compiled' if compiled else 'eager'}"


def measure(step: Callable[[], int], warmup: int, windows: int, window_s: float, sync) -> dict:
    """``step`` (returns its images) ``warmup`` times, then ``windows`` windows of at least
    ``window_s`` seconds and 2 steps, each between two device syncs with none inside."""
    for _ in range(warmup):
        step()
    sync()
    rates, steps = [], 0
    for _ in range(windows):
        t0, images, k = time.perf_counter(), 0, 0
        while k < 2 or time.perf_counter() - t0 < window_s:
            images += step()
            k += 1
        sync()
        rates.append(images / (time.perf_counter() - t0))
        steps += k
    med = sorted(rates)[len(rates) // 2]
    return {"img_per_s": med, "windows": rates, "spread": (max(rates) - min(rates)) / med, "steps": steps}


def run_group(args) -> int:
    """One (arch, compile) group in this process; bench.json of the group rewritten after every row."""
    import torch

    from invasive_dist.bench import batch_pool, endless, hardware, parse_backend, verdict
    from invasive_dist.build import loader_spec
    from invasive_dist.config import load_config
    from invasive_dist.data import build_loader, resolve_backend
    from invasive_dist.distributed import build_accelerator, world_info_from_env
    from invasive_dist.train import Trainer, build_parts

    deadline = time.time() + args.limit_s - 5
    arch, compiled = args.group.split(":")
    compiled = compiled == "compiled"
    out = Path(args.out) / f"group-{arch}-{'compiled' if compiled else 'eager'}.json"
    cfg = load_config(
        args.config, [*args.overrides, f"model.arch={arch}", f"train.compile={str(compiled).lower()}"]
    )
    # The model side is the Trainer's train_step, built without loaders (as `invasive-dist bench`
    # does); each backend builds its own loader below.
    world = world_info_from_env()
    acc = build_accelerator(cfg, world)
    parts = build_parts(cfg, acc, world, train_loader=False, val_loader=False)
    trainer = Trainer(cfg, acc, world, parts)
    trainer.model.train()
    dev = trainer.device
    cuda = dev.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    def reset_peak() -> None:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)

    def peak() -> int | None:
        return int(torch.cuda.max_memory_allocated(dev)) if cuda else None

    d = cfg.data
    per_step = trainer.plan.per_device * trainer.plan.accum
    result = {
        "group": group_name(arch, compiled),
        "settings": {
            "arch": arch,
            "image_size": d.image_size,
            "batch_size": trainer.plan.per_device,
            "mixed_precision": cfg.train.mixed_precision,
            "channels_last": trainer.channels_last,
            "compile": compiled,
            "train_images": len(trainer.train_idx),
            "data_root": d.root,
            "data_torch": dataclasses.asdict(d.torch),
            "data_dali": dataclasses.asdict(d.dali),
            "warmup": args.warmup,
            "windows": args.windows,
            "window_s": args.window_s,
        },
        "hardware": hardware(dev),
        "model_img_per_s": None,
        "rows": [],
    }

    def write() -> None:
        out.write_text(json.dumps(result, indent=2) + "\n")

    write()
    print(f"== {result['group']}: {describe(result)}", flush=True)
    reset_peak()
    t0 = time.perf_counter()
    pool = batch_pool(4, trainer.plan.per_device, d.image_size, dev, trainer.channels_last)
    batches = itertools.cycle(pool)

    def model_step() -> int:
        trainer.train_step(lambda: next(batches))
        return per_step

    model = measure(model_step, args.warmup, args.windows, args.window_s, sync)
    model.update(peak_mem_bytes=peak(), seconds_with_warmup=time.perf_counter() - t0)
    result["model"] = model
    result["model_img_per_s"] = model["img_per_s"]
    pool = batches = None  # the pool's device memory goes before the backends'
    write()
    print(
        f"   model alone: {fmt(model['img_per_s'])} img/s (spread {model['spread']:.1%}), in {model['seconds_with_warmup']:.0f} s",
        flush=True,
    )

    def measure_backend(spec: str) -> dict:
        name, bcfg = parse_backend(spec, cfg)
        row = {"resolved": resolve_backend(name)}
        reset_peak()
        t0 = time.perf_counter()
        # No end of training: the loader is drawn across as many epochs as the windows need.
        spec = dataclasses.replace(loader_spec(bcfg, acc, trainer.plan, trainer.train_idx, True), epochs=None)
        loader = build_loader(spec, bcfg.data)
        row["setup_s"] = time.perf_counter() - t0
        row.update(getattr(loader, "build_info", {}))
        it = endless(loader)
        try:
            inp = measure(lambda: next(it).images.shape[0], args.warmup, args.windows, args.window_s, sync)
        finally:
            it.close()  # stops DataLoader workers / DALI pipelines before the next measurement
        it2 = endless(loader)  # a fresh iteration, as an epoch of training starts one

        def e2e_step() -> int:
            trainer.train_step(lambda: next(it2))
            return per_step

        try:
            e2e = measure(e2e_step, args.warmup, args.windows, args.window_s, sync)
        finally:
            it2.close()
        row.update(
            input=inp,
            e2e=e2e,
            input_img_per_s=inp["img_per_s"],
            e2e_img_per_s=e2e["img_per_s"],
            peak_mem_bytes=peak(),
            seconds=time.perf_counter() - t0,
            **verdict(inp["img_per_s"], model["img_per_s"], e2e["img_per_s"]),
            error=None,
        )
        return row

    for spec in args.backends:
        row: dict = {"backend": spec, "model_img_per_s": model["img_per_s"]}
        if time.time() > deadline - 15:
            row["error"] = "not run: the group's time limit was reached"
            result["rows"].append(row)
            write()
            continue
        try:
            row.update(measure_backend(spec))
            print(
                f"   {spec}: input {fmt(row['input_img_per_s'])}, e2e {fmt(row['e2e_img_per_s'])} img/s, "
                f"e2e/min {row['e2e_over_min']:.2f}, in {row['seconds']:.0f} s",
                flush=True,
            )
        except Exception as e:  # one backend failing must not hide the others' figures
            first = (str(e).strip().splitlines() or [""])[0]
            row["error"] = f"{type(e).__name__}: {first}"
            print(f"   {spec}: FAILED: {row['error']}", flush=True)
            traceback.print_exc()
        result["rows"].append(row)
        write()
    return 0


# ----------------------------------------------------------------------------------------------
# The parent: groups in subprocesses under the budget, bench.json and the table.


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def gib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**30:.1f}"


def describe(group: dict) -> str:
    s, hw = group["settings"], group["hardware"]
    where = f"{hw['gpu']}" if hw.get("gpu") else f"CPU {hw['cpu']}"
    return (
        f"{s['image_size']}px batch {s['batch_size']} {s['mixed_precision']} channels_last {s['channels_last']}, "
        f"{s['train_images']} training images, on {where}"
    )


def summary(bench: dict) -> str:
    groups = bench["groups"]
    done = [g for g in groups if g.get("hardware")]
    lines = []
    if done:
        hw, s = done[0]["hardware"], done[0]["settings"]
        gpu = (
            f"{hw['gpu']} ({hw.get('gpu_memory_bytes', 0) / 2**30:.0f} GiB, driver {hw.get('gpu_driver') or '?'})"
            if hw.get("gpu")
            else "NO GPU"
        )
        lines.append(
            f"{bench['date']} on {gpu}; torch {hw['torch']} (CUDA {hw['cuda']}), torchvision {hw['torchvision']}, DALI {hw['dali'] or '-'}"
        )
        lines.append(
            f"{s['image_size']} px, batch {s['batch_size']}, {s['mixed_precision']}, channels_last {s['channels_last']}, "
            f"{s['train_images']} training images; median of {s['windows']} windows >= {s['window_s']} s after {s['warmup']} warm-up steps"
        )
    for step in bench.get("steps", []):
        lines.append(
            f"step {step['name']}: {step['status']} ({step['seconds']} s){': ' + step['note'] if step.get('note') else ''}"
        )
    lines.append("")
    lines.append(
        f"{'group':<18} {'backend':<10} {'input':>8} {'model':>7} {'e2e':>7} {'e2e/min':>7} {'spread':>6} {'peak GiB':>8}  note"
    )
    for g in groups:
        name = g["group"]
        model = g.get("model")
        if model is None:
            lines.append(f"{name:<18} {'(model)':<10} {'':>8} {'-':>7}  {g.get('error') or 'not run'}")
            continue
        mem = model.get("peak_mem_bytes")
        lines.append(
            f"{name:<18} {'(model)':<10} {'':>8} {fmt(model['img_per_s']):>7} {'':>7} {'':>7} "
            f"{model['spread']:>6.1%} {gib(mem):>8}"
        )
        rows = {r["backend"]: r for r in g.get("rows", [])}
        for b in g.get("planned", BACKENDS):
            r = rows.get(b)
            if r is None:
                why = g.get("error") or "not reached"
                lines.append(f"{name:<18} {b:<10} {'-':>8}  {why}")
            elif r.get("error"):
                lines.append(f"{name:<18} {b:<10} {'-':>8}  {r['error'][:90]}")
            else:
                spread = max(r["input"]["spread"], r["e2e"]["spread"])
                mem = r.get("peak_mem_bytes")
                note = r["bound"] + "-bound"
                if "cache_build_s" in r:
                    note += f"; cache {r['cache_bytes'] / 2**30:.2f} GiB in {r['cache_build_s']:.1f} s"
                lines.append(
                    f"{name:<18} {b:<10} {fmt(r['input_img_per_s']):>8} {fmt(r['model_img_per_s']):>7} "
                    f"{fmt(r['e2e_img_per_s']):>7} {r['e2e_over_min']:>7.2f} {spread:>6.1%} "
                    f"{gib(mem):>8}  {note}"
                )
    return "\n".join(lines)


def write_all(out: Path, bench: dict) -> None:
    (out / "bench.json").write_text(json.dumps(bench, indent=2) + "\n")
    (out / "summary.txt").write_text(summary(bench) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/bench_r50.yaml")
    p.add_argument("--out", default="runs/gpu-check")
    p.add_argument("--budget-s", type=float, default=300, help="wall time for all groups")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--window-s", type=float, default=1.5)
    p.add_argument("--groups", default=",".join(f"{a}:{'compiled' if c else 'eager'}" for a, c in GROUPS))
    p.add_argument("--backend", dest="backends", action="append", default=None)
    p.add_argument("--steps-json", default=None, help="the shell script's step results, for the table")
    p.add_argument("--summary", default=None, metavar="OUT", help="print the table of OUT/bench.json")
    p.add_argument("--group", default=None, help=argparse.SUPPRESS)  # a child: run this group only
    p.add_argument("--limit-s", type=float, default=600, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted overrides for every group")
    args = p.parse_args(argv)
    args.backends = args.backends or BACKENDS
    if args.summary:
        print(summary(json.loads((Path(args.summary) / "bench.json").read_text())))
        return 0
    if args.group:
        return run_group(args)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    bench: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": sys.argv,
        "groups": [],
    }
    if args.steps_json and Path(args.steps_json).exists():
        bench["steps"] = json.loads(Path(args.steps_json).read_text())
    failed = 0
    for spec in args.groups.split(","):
        arch, mode = spec.split(":")
        gfile = out / f"group-{arch}-{mode}.json"
        gfile.unlink(missing_ok=True)
        entry: dict = {"group": group_name(arch, mode == "compiled"), "planned": args.backends}
        bench["groups"].append(entry)
        left = args.budget_s - (time.time() - start)
        if left < MIN_GROUP_S:
            entry["error"] = f"not run: {left:.0f} s of the budget left"
            write_all(out, bench)
            continue
        cmd = [
            sys.executable,
            __file__,
            "--group",
            spec,
            "--limit-s",
            str(left),
            "--out",
            str(out),
            "--config",
            args.config,
            "--warmup",
            str(args.warmup),
            "--windows",
            str(args.windows),
            "--window-s",
            str(args.window_s),
        ]
        cmd += [a for b in args.backends for a in ("--backend", b)] + args.overrides
        try:
            rc = subprocess.run(cmd, timeout=left).returncode
            if rc:
                entry["error"] = f"the group's process failed (exit {rc}): see gpu_check.log"
        except subprocess.TimeoutExpired:
            rc = 124
            entry["error"] = f"the group's process was stopped at the budget ({left:.0f} s)"
        failed += rc != 0
        if gfile.exists():
            entry.update({k: v for k, v in json.loads(gfile.read_text()).items() if k != "group"})
        write_all(out, bench)
    print()
    print(summary(bench))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# The GPU check: everything in this project that needs a CUDA device, in one go, a short table last.
#
#   bash tests/gpu_check.sh
#
# For a GPU machine where nothing can be installed from a registry: the project is used in place
# (PYTHONPATH), python3 comes from PATH, DALI from /tmp/dali-site (installed there first from the
# parts of shared/device/dali-parts.sh found in .dev/dali or /tmp/dali-parts). Steps, each with a time limit
# taken from what is left of the budget, each reported whatever the others do:
#   1. dali      make nvidia.dali importable (skipped when it already is, or no parts are here)
#   2. data      2,295 synthetic 1154x866 JPEGs (the real train set's count and size) with the
#                project's generator, into data/bench (kept: a second run reuses them)
#   3. tests     python3 -m pytest -m gpu tests -q
#   4. eager     bench, configs/bench_r50.yaml (ResNet-50, 224 px, bf16, channels_last, batch 256):
#                synthetic, gpu_cache, dali (hw_decoder_load 1.0), dali at 0.65, torch
#   5. compiled  the same with train.compile=true: synthetic, gpu_cache, dali, torch
#   6. the table, from the two bench.json files (a backend that failed shows its error, one the
#      step's time ran out before shows "not reached": bench rewrites bench.json after every row)
# Budget: GPU_CHECK_BUDGET_S=470 (about 8 minutes on one H100 with a warm page cache: data ~30 s,
# tests ~60 s, eager ~120 s, compiled ~180 s). Other knobs: GPU_CHECK_IMAGES, GPU_CHECK_STEPS,
# GPU_CHECK_WARMUP, GPU_CHECK_DATA, GPU_CHECK_SIZE, and GPU_CHECK_OVERRIDES (appended to every bench
# command; a dry run on CPU: GPU_CHECK_IMAGES=40 GPU_CHECK_SIZE=96x72 GPU_CHECK_STEPS=3 GPU_CHECK_OVERRIDES=
# 'model.arch=resnet18 data.image_size=64 data.batch_size=8 data.num_workers=0 train.mixed_precision="no"').
# Results: $OUT when set (the folder a GPU runner returns), else runs/gpu-check:
#   gpu_check.log  everything printed      summary.txt  the table
#   eager/bench.json, compiled/bench.json  figures, settings, hardware
set -uo pipefail # no -e: a failing step is reported and the next one runs

cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
RES=${OUT:-$ROOT/runs/gpu-check}
WORK=${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/invasive-dist-gpu-check} # scratch, never returned
DATA=${GPU_CHECK_DATA:-$ROOT/data/bench}
IMAGES=${GPU_CHECK_IMAGES:-2295}
SIZE=${GPU_CHECK_SIZE:-1154x866}
STEPS=${GPU_CHECK_STEPS:-12}
WARMUP=${GPU_CHECK_WARMUP:-3}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
RESERVE=15 # seconds kept for the table
read -r -a OVERRIDES <<<"${GPU_CHECK_OVERRIDES:-}"
EAGER_BACKENDS=(synthetic gpu_cache dali dali:dali_hw_decoder_load=0.65 torch)
COMPILED_BACKENDS=(synthetic gpu_cache dali torch)

mkdir -p "$RES" "$WORK"
rm -f "$RES/summary.txt" "$WORK/steps.tsv"
rm -rf "$RES/eager" "$RES/compiled"
exec > >(tee -a "$RES/gpu_check.log") 2>&1

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=python3

# step NAME CAP COMMAND...: run COMMAND with a time limit of min(CAP, budget left); record the result.
step() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - SECONDS - RESERVE))
    local limit=$((cap < left ? cap : left))
    if ((limit < 20)); then
        echo "== $name: skipped, ${left}s of the budget left"
        printf '%s\tskipped (budget spent)\t0\n' "$name" >>"$WORK/steps.tsv"
        return 1
    fi
    echo "== $name (limit ${limit}s, $((BUDGET - SECONDS))s of the budget left): $*"
    local t0=$SECONDS rc status
    timeout -k 10 "$limit" "$@"
    rc=$?
    case $rc in
    0) status=ok ;;
    124 | 137) status="TIMED OUT at ${limit}s" ;;
    *) status="FAILED (exit $rc)" ;;
    esac
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" >>"$WORK/steps.tsv"
    echo "== $name: $status in $((SECONDS - t0))s"
    return "$rc"
}

echo "== GPU check of $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?') on $(hostname 2>/dev/null || echo "?"), $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
$PY -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'

# 1. DALI
if [[ -d /tmp/dali-site ]]; then
    export PYTHONPATH="$PYTHONPATH:/tmp/dali-site"
fi
install_dali() { # shared/device/dali-install.sh, inlined: shared/ does not travel with the project
    mkdir -p /tmp/dali-whl &&
        cat /tmp/dali-parts/p? | tar xf - -C /tmp/dali-whl &&
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/dali-site /tmp/dali-whl/*.whl
}
if ! $PY -c 'import nvidia.dali' 2>/dev/null; then
    # The parts (shared/device/dali-parts.sh) may come with the tree in .dev/dali, or have been put
    # into /tmp/dali-parts by earlier calls (one 60 MB part per call fits a 64 MiB transfer).
    if compgen -G '.dev/dali/p?' >/dev/null; then
        mkdir -p /tmp/dali-parts && cp -n .dev/dali/p? /tmp/dali-parts/
    fi
    if compgen -G '/tmp/dali-parts/p?' >/dev/null; then
        export -f install_dali
        export PY
        step dali 120 bash -c install_dali
        export PYTHONPATH="$PYTHONPATH:/tmp/dali-site"
    else
        echo "== dali: nvidia.dali does not import and no DALI parts are here; the dali rows will say so"
        printf 'dali\tnot available\t0\n' >>"$WORK/steps.tsv"
    fi
fi
$PY -c 'import nvidia.dali as d; print("DALI", d.__version__)' 2>/dev/null || true

# 2. data
step data 120 $PY -m invasive_dist synth --out "$DATA" --n-train "$IMAGES" --n-test 8 --size "$SIZE" \
    --seed 0 --workers "$(nproc)"

# 3. tests
# shellcheck disable=SC2016 # $0, $1 and PIPESTATUS belong to the inner bash
step tests 150 bash -c '"$0" -m pytest -m gpu tests -q -p no:cacheprovider 2>&1 | tee "$1"; exit "${PIPESTATUS[0]}"' \
    "$PY" "$WORK/pytest.log"

# 4, 5. bench
BENCH=("$PY" -m invasive_dist bench --config configs/bench_r50.yaml --steps "$STEPS" --warmup "$WARMUP")
SETTINGS=("data.root=$DATA" "output.root=$WORK/runs" "${OVERRIDES[@]}")
args=()
for b in "${EAGER_BACKENDS[@]}"; do args+=(--backend "$b"); done
step eager 170 "${BENCH[@]}" --out "$RES/eager" "${args[@]}" "${SETTINGS[@]}" train.compile=false
args=()
for b in "${COMPILED_BACKENDS[@]}"; do args+=(--backend "$b"); done
step compiled 240 "${BENCH[@]}" --out "$RES/compiled" "${args[@]}" "${SETTINGS[@]}" train.compile=true

# 6. the table
echo
$PY - "$RES" "$WORK" "${EAGER_BACKENDS[*]}" "${COMPILED_BACKENDS[*]}" <<'EOF' | tee "$RES/summary.txt"
import json, re, sys
from pathlib import Path

res, work, planned = Path(sys.argv[1]), Path(sys.argv[2]), {"eager": sys.argv[3].split(), "compiled": sys.argv[4].split()}


def fmt(x):
    return "-" if x is None else (f"{x:,.0f}" if x >= 100 else f"{x:.1f}")


results = {}
for mode in planned:
    try:
        results[mode] = json.loads((res / mode / "bench.json").read_text())
    except (OSError, ValueError):
        results[mode] = None
hw = next((r["hardware"] for r in results.values() if r), None)
if hw:
    gpu = f"{hw['gpu']} ({hw.get('gpu_memory_bytes', 0) / 2**30:.0f} GiB, driver {hw.get('gpu_driver') or '?'})" if hw.get("gpu") else "NO GPU"
    print(f"GPU check on {gpu}; {hw['cpu']} x{hw['cpu_cores']}; torch {hw['torch']} (CUDA {hw['cuda']}), DALI {hw['dali'] or '-'}")
s = next((r["settings"] for r in results.values() if r), None)
if s:
    print(
        f"{s['arch']} {s['image_size']}px, batch {s['batch_size']}, {s['mixed_precision']}, channels_last {s['channels_last']}, "
        f"{s['train_images']} training images; {s['steps']} measured steps after {s['warmup']} warm-up; img/s on one device"
    )
print()
print(f"{'step':<10} result")
for line in (work / "steps.tsv").read_text().splitlines() if (work / "steps.tsv").exists() else []:
    name, status, secs = line.split("\t")
    note = ""
    if name == "tests" and (work / "pytest.log").exists():
        tail = [l for l in (work / "pytest.log").read_text().splitlines() if re.search(r"\d+ (passed|failed|error|skipped|deselected)", l)]
        note = ": " + tail[-1].strip("= ") if tail else ""
    print(f"{name:<10} {status} ({secs}s){note}")
print()
print(f"{'mode':<9} {'backend':<32} {'input':>8} {'model':>8} {'e2e':>8} {'e2e/min':>8}  bound")
for mode, want in planned.items():
    r = results[mode]
    rows = {row["backend"]: row for row in (r or {}).get("rows", [])}
    model = (r or {}).get("model_img_per_s")
    for b in want:
        row = rows.get(b)
        if row is None:
            why = "not reached" if r else "no bench.json: see gpu_check.log"
            print(f"{mode:<9} {b:<32} {'-':>8} {fmt(model):>8} {'-':>8} {'-':>8}  ({why})")
        elif row.get("error"):
            print(f"{mode:<9} {b:<32} {'FAILED':>8} {fmt(model):>8} {'-':>8} {'-':>8}  {row['error'][:110]}")
        else:
            print(
                f"{mode:<9} {b:<32} {fmt(row['input_img_per_s']):>8} {fmt(model):>8} {fmt(row['e2e_img_per_s']):>8} "
                f"{row['e2e_over_min']:>8.2f}  {row['bound']}"
            )
print()
print("H100 reference (shared/device/README.md): model 3,975 eager / 5,611 compiled; input: torch DataLoader 315,")
print("DALI hw_decoder_load 1.0 5,238 (default split 1,802); DALI 1.0 feeding eager ResNet-50 2,862.")
EOF
echo "results in $RES (gpu_check.log, summary.txt, eager/bench.json, compiled/bench.json)"

#!/usr/bin/env bash
# The GPU check: everything in this project that needs a CUDA device, in one go, a one-screen table last.
#
#   bash tests/gpu_check.sh                  # on the GPU machine (make gpu-check)
#   GPU_CHECK_DRY=1 bash tests/gpu_check.sh  # its CPU parts here: tiny data, ResNet-18 eager, 64 px
#
# For a bare GPU machine (python3 with torch, no DALI, no registry): the project is used in place
# (PYTHONPATH), DALI comes from /tmp/dali-site, installed there first from the parts made by the
# device notes' dali-parts.sh when they are in .dev/dali or /tmp/dali-parts. Steps, each with a time
# limit taken from what is left of the budget, each reported whatever the others do:
#   1. dali    make nvidia.dali importable (skipped when it already is; without parts the dali rows say so)
#   2. data    2,295 synthetic 1154x866 JPEGs (the real train set's count and size; bench trains on
#              the 1,836 of the training folds) with the project's generator into data/bench, kept
#   3. tests   python3 -m pytest -m gpu tests -q (every CUDA test lives in tests/gpu)
#   4. bench   python3 -m invasive_dist bench, configs/bench_r50.yaml (224 px, bf16, channels_last,
#              batch 256), once per group: ResNet-50 eager, then compiled, then ResNet-18 eager and
#              compiled, each its own process (compiled once; a CUDA failure cannot take the other
#              groups with it) under a time limit from the budget left; per group the model alone and
#              synthetic, gpu_cache, dali, torch (input alone, end to end); each figure the median of 3
#              windows of >= 1.5 s, with their spread and peak memory. What the budget cuts says so.
#   5. table   the steps' results, then `invasive-dist bench --summary` of every group's bench.json
# Budget: GPU_CHECK_BUDGET_S=400 (expected on an H100/H200: data ~20 s, tests ~60 s, ResNet-50
# eager ~60 s, compiled ~150 s, ResNet-18 ~100 s). Other knobs: GPU_CHECK_IMAGES, GPU_CHECK_SIZE,
# GPU_CHECK_DATA, GPU_CHECK_GROUPS (e.g. resnet50:eager,resnet50:compiled), GPU_CHECK_BACKENDS
# (e.g. synthetic,gpu_cache), GPU_CHECK_WINDOW_S, GPU_CHECK_OVERRIDES (appended to every group's config).
# Results: $OUT when set (the folder a GPU runner returns), else runs/gpu-check:
#   gpu_check.log  everything printed   summary.txt  the steps and the table   pytest.log
#   bench-ARCH-MODE/bench.json  each group's figures (every window), settings, hardware (rewritten
#   after every row: a cut-short run keeps what it measured; layout in invasive_dist/bench.py)
set -uo pipefail # no -e: a failing step is reported and the next one runs

cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
RES=${OUT:-$ROOT/runs/gpu-check}
DRY=${GPU_CHECK_DRY:-0}
if [[ $DRY == 1 ]]; then
    : "${GPU_CHECK_IMAGES:=40}" "${GPU_CHECK_SIZE:=96x72}" "${GPU_CHECK_GROUPS:=resnet18:eager}"
    : "${GPU_CHECK_WINDOW_S:=0.2}" "${GPU_CHECK_DATA:=${TMPDIR:-/tmp}/invasive-dist-gpu-check-dry}"
    : "${GPU_CHECK_OVERRIDES:=data.image_size=64 data.batch_size=8 data.torch.num_workers=2 train.mixed_precision=no}"
    # One OpenMP thread: on a loaded 2-core machine two spin-waiting threads made the ResNet-18 step
    # 40x slower (2.3 vs 97.5 img/s at 64 px, batch 8) and its figures swing by 20x between windows.
    : "${OMP_NUM_THREADS:=1}"
    export OMP_NUM_THREADS
fi
DATA=${GPU_CHECK_DATA:-$ROOT/data/bench}
IMAGES=${GPU_CHECK_IMAGES:-2295}
SIZE=${GPU_CHECK_SIZE:-1154x866}
BUDGET=${GPU_CHECK_BUDGET_S:-400}
GROUPS_=${GPU_CHECK_GROUPS:-resnet50:eager,resnet50:compiled,resnet18:eager,resnet18:compiled}
BACKENDS_=${GPU_CHECK_BACKENDS:-synthetic,gpu_cache,dali,torch}
WINDOW_S=${GPU_CHECK_WINDOW_S:-1.5}
read -r -a OVERRIDES <<<"${GPU_CHECK_OVERRIDES:-}"
RESERVE=15     # seconds kept for the table (one python start that imports torch)
MIN_GROUP_S=40 # a group given less is reported as not run rather than started

mkdir -p "$RES"
rm -rf "$RES"/summary.txt "$RES"/steps.tsv "$RES"/pytest.log "$RES"/bench-*
exec > >(tee -a "$RES/gpu_check.log") 2>&1

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

# step NAME CAP COMMAND...: run COMMAND with a time limit of min(CAP, budget left); record the result.
step() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - SECONDS - RESERVE))
    local limit=$((cap < left ? cap : left))
    if ((limit < 20)); then
        echo "== $name: skipped, ${left}s of the budget left"
        printf '%s\tskipped (budget spent)\t0\n' "$name" >>"$RES/steps.tsv"
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
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" >>"$RES/steps.tsv"
    echo "== $name: $status in $((SECONDS - t0))s"
    return "$rc"
}

echo "== GPU check of $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?') on $(hostname 2>/dev/null || echo "?"), $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
$PY -c 'import sys, torch, torchvision; print("python", sys.version.split()[0], "torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'

# 1. DALI
[[ -d /tmp/dali-site ]] && export PYTHONPATH="$PYTHONPATH:/tmp/dali-site"
install_dali() { # the device notes' dali-install.sh, inlined: those notes do not travel with the project
    mkdir -p /tmp/dali-whl &&
        cat /tmp/dali-parts/p? | tar xf - -C /tmp/dali-whl &&
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/dali-site /tmp/dali-whl/*.whl
}
if ! $PY -c 'import nvidia.dali' 2>/dev/null; then
    # The parts may come with the tree in .dev/dali, or have been put into /tmp/dali-parts by
    # earlier calls (one 60 MB part per call fits a 64 MiB transfer).
    if compgen -G '.dev/dali/p?' >/dev/null; then
        mkdir -p /tmp/dali-parts && cp -n .dev/dali/p? /tmp/dali-parts/
    fi
    if [[ $(compgen -G '/tmp/dali-parts/p?' | wc -l) -ge 4 ]]; then
        export -f install_dali
        export PY
        step dali 90 bash -c install_dali
        export PYTHONPATH="$PYTHONPATH:/tmp/dali-site"
    else
        echo "== dali: nvidia.dali does not import and the 4 DALI parts are not here; the dali rows will say so"
        printf 'dali\tnot available: no DALI parts on this machine\t0\n' >>"$RES/steps.tsv"
    fi
fi
$PY -c 'import nvidia.dali as d; print("DALI", d.__version__)' 2>/dev/null || true

# 2. data (kept between runs: the generator is skipped when the folder already has the images)
if [[ $(find "$DATA/train" -name '*.jpg' 2>/dev/null | wc -l) -ge $IMAGES ]]; then
    echo "== data: $DATA already holds $IMAGES images"
    printf 'data\tok (kept)\t0\n' >>"$RES/steps.tsv"
else
    rm -rf "$DATA"
    step data 90 $PY -m invasive_dist synth --out "$DATA" --n-train "$IMAGES" --n-test 8 --size "$SIZE" \
        --seed 0 --workers "$(nproc)"
fi

# 3. tests
# shellcheck disable=SC2016 # $0, $1 and PIPESTATUS belong to the inner bash
step tests 120 bash -c '"$0" -m pytest -m gpu tests -q -p no:cacheprovider 2>&1 | tee "$1"; exit "${PIPESTATUS[0]}"' \
    "$PY" "$RES/pytest.log"

# 4. bench: one process per (model, compile mode) group, in GROUPS_'s order (the ResNet-50 rows the
# goals are held against first), each with a time limit of what is left of the budget. bench itself
# does not start a row it does not expect to end within --time-limit-s (20 s under the kill: the
# process's start, torch's import, and a DALI pipeline's teardown come on top of bench's own clock).
BENCH_ARGS=(--config configs/bench_r50.yaml --warmup 3 --steps 2 --windows 3 --window-s "$WINDOW_S")
for b in ${BACKENDS_//,/ }; do BENCH_ARGS+=(--backend "$b"); done
BENCH_DIRS=()
for group in ${GROUPS_//,/ }; do
    arch=${group%%:*} mode=${group#*:}
    dir=$RES/bench-$arch-$mode
    BENCH_DIRS+=("$dir")
    case $mode in
    eager) compile=false ;;
    compiled) compile=true ;;
    *)
        echo "== bench $group: GPU_CHECK_GROUPS takes ARCH:eager or ARCH:compiled"
        printf 'bench %s\tnot run: mode %s is not eager or compiled\t0\n' "$group" "$mode" >>"$RES/steps.tsv"
        continue
        ;;
    esac
    left=$((BUDGET - SECONDS - RESERVE))
    if ((left < MIN_GROUP_S)); then
        echo "== bench $arch $mode: not run, ${left}s of the budget left"
        printf 'bench %s %s\tnot run: %ss of the budget left\t0\n' "$arch" "$mode" "$left" >>"$RES/steps.tsv"
        continue
    fi
    step "bench $arch $mode" "$left" $PY -m invasive_dist bench "${BENCH_ARGS[@]}" --out "$dir" \
        --time-limit-s $((left - 20)) "data.root=$DATA" "output.root=${TMPDIR:-/tmp}/invasive-dist-gpu-check-runs" \
        "model.arch=$arch" "train.compile=$compile" "${OVERRIDES[@]}"
done

# 5. the table: each step's result (pytest's last count line for the tests), then every group's rows
# (a group that left no bench.json, or rows it did not reach, say so).
{
    echo "GPU check of $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u +%FT%TZ), ${SECONDS}s in all"
    while IFS=$'\t' read -r name status secs; do
        note=""
        if [[ $name == tests && -f $RES/pytest.log ]]; then
            note=$(grep -E '[0-9]+ (passed|failed|error|skipped)' "$RES/pytest.log" | tail -n 1 | sed -E 's/^=+ *| *=+$//g')
        fi
        echo "step $name: $status (${secs} s)${note:+: $note}"
    done < <(cat "$RES/steps.tsv" 2>/dev/null)
    echo
    timeout -k 10 60 $PY -m invasive_dist bench --summary "${BENCH_DIRS[@]}" 2>&1
} >"$RES/summary.txt"
echo
cat "$RES/summary.txt"
echo "results in $RES (gpu_check.log, summary.txt, bench-*/bench.json, pytest.log)"

#!/usr/bin/env bash
# The GPU check: everything in this project that needs a CUDA device, most valuable figures first, in
# one time budget, a one-screen table last (docs/performance.md says what it will and will not produce).
#
#   bash tests/gpu_check.sh prepare          # DALI, the bench data (~25 s) and the compile toolchain only
#   bash tests/gpu_check.sh                  # the check (make gpu-check); prepares first if not yet done
#   GPU_CHECK_DRY=1 bash tests/gpu_check.sh  # its logic on a CPU (make gpu-check-dry): tiny data, 64 px
#
# Steps, each under a time limit taken from what is left of the budget, each reported whatever the
# others do:
#   dali       nvidia.dali must import for the dali rows (pip install nvidia-dali-cuda130, or -cuda120
#              for a CUDA 12 driver); without it those rows say so and the others run. A developer
#              machine without a registry can install it from wheel parts (tests/gpu/README.md).
#   data       2,295 synthetic 1154x866 JPEGs (the real train set's count and size; bench trains on the
#              1,836 of the training folds) with the project's generator into data/bench; kept, so
#              `prepare` can make them before the GPU time starts
#   toolchain  torch.compile's Triton builds its launchers with a C compiler and Python.h: checked
#              first (one compile of `#include <Python.h>`); if missing, the compiled groups are one
#              line each saying so, not a failure at the first kernel
#   then the plan, GPU_CHECK_PLAN, in order of value (one item = one process under its own limit):
#     resnet50:eager:synthetic+gpu_cache+dali         bench, configs/bench_r50.yaml (224 px, bf16,
#     resnet50:compiled:synthetic+gpu_cache+dali+torch  channels_last, batch 256): the model alone and
#                                                     per backend input alone and end to end; the torch
#                                                     row once (CPU-bound, alike in every group), last
#     tests                                           pytest -m gpu tests/gpu (what bench measures at scale,
#                                                     tests/gpu/test_gpu_bench.py, is left out)
#     resnet18:eager:synthetic+gpu_cache+dali, resnet18:compiled:synthetic+gpu_cache+dali
#   An item starts only if the budget left holds its minimum (eager 45 s, compiled 120 s, tests 30 s);
#   else it is CUT, and the table's last line names every cut item and the command that runs them.
#   Inside a bench item, bench itself skips a row that its --time-limit-s cannot cover (the row says so).
#   Estimated on an H100/H200 with 16 cores (estimates, not measured): ResNet-50 eager ~70 s, compiled
#   ~170 s + the torch row ~20 s, tests ~60 s, ResNet-18 eager ~60 s, compiled ~110 s: the default
#   budget of 420 s is expected to cut ResNet-18 compiled, and ResNet-18 eager in part.
# Knobs: GPU_CHECK_BUDGET_S (420), GPU_CHECK_PLAN, GPU_CHECK_IMAGES, GPU_CHECK_SIZE, GPU_CHECK_DATA,
# GPU_CHECK_WINDOW_S, GPU_CHECK_OVERRIDES (appended to every bench's config), GPU_CHECK_SIMULATE
# (KEY=SECONDS,...: the item KEY (versions, dali, data, tests, ARCH:MODE, * for every other) sleeps
# SECONDS instead of running, under the same limits; e.g. resnet50:compiled=900 shows what a slow group does to the rest).
# Results: $OUT when set, else runs/gpu-check:
#   gpu_check.log  everything printed   summary.txt  the steps, the table, the cut line   pytest.log
#   measured.txt   the GPU tests' measured values beside their bounds (tests/gpu/conftest.py)
#   bench-ARCH-MODE/bench.json  each group's figures (every window), settings, hardware (rewritten
#   after every row: a cut-short run keeps what it measured; layout in invasive_dist/bench.py)
set -uo pipefail # no -e: a failing step is reported and the next one runs

cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
RES=${OUT:-$ROOT/runs/gpu-check}
MODE=${1:-check}
if [[ $MODE != check && $MODE != prepare ]]; then
    echo "usage: bash tests/gpu_check.sh [prepare]" >&2
    exit 2
fi
DRY=${GPU_CHECK_DRY:-0}
if [[ $DRY == 1 ]]; then
    : "${GPU_CHECK_IMAGES:=40}" "${GPU_CHECK_SIZE:=96x72}" "${GPU_CHECK_BUDGET_S:=240}"
    : "${GPU_CHECK_WINDOW_S:=0.2}" "${GPU_CHECK_DATA:=${TMPDIR:-/tmp}/invasive-dist-gpu-check-dry}"
    : "${GPU_CHECK_OVERRIDES:=data.image_size=64 data.batch_size=8 data.torch.num_workers=2 train.mixed_precision=no}"
    # On a CPU only ResNet-18 eager runs for real (ResNet-50 and Inductor's compile take minutes
    # there); the other bench items sleep a second, so the order, limits and cuts are still shown.
    : "${GPU_CHECK_SIMULATE=resnet50:eager=1,resnet50:compiled=1,resnet18:compiled=1}"
    # One OpenMP thread: on a loaded 2-core machine two spin-waiting threads made the ResNet-18 step
    # 40x slower (2.3 vs 97.5 img/s at 64 px, batch 8) and its figures swing by 20x between windows.
    : "${OMP_NUM_THREADS:=1}"
    export OMP_NUM_THREADS
fi
DATA=${GPU_CHECK_DATA:-$ROOT/data/bench}
IMAGES=${GPU_CHECK_IMAGES:-2295}
SIZE=${GPU_CHECK_SIZE:-1154x866}
BUDGET=${GPU_CHECK_BUDGET_S:-420}
PLAN=${GPU_CHECK_PLAN:-resnet50:eager:synthetic+gpu_cache+dali resnet50:compiled:synthetic+gpu_cache+dali+torch tests resnet18:eager:synthetic+gpu_cache+dali resnet18:compiled:synthetic+gpu_cache+dali}
WINDOW_S=${GPU_CHECK_WINDOW_S:-1.5}
DALI_PARTS=${GPU_CHECK_DALI_PARTS:-4} # the DALI wheel in parts, for machines without a registry
SIMULATE=${GPU_CHECK_SIMULATE:-}
read -r -a OVERRIDES <<<"${GPU_CHECK_OVERRIDES:-}"
RESERVE=15 # seconds kept for the table (one python start that imports torch)
# minimum_s KIND: what an item needs to yield anything (a compiled group spends ~100 s compiling);
# with less of the budget left it is cut rather than started. Small on a CPU, where nothing is real.
minimum_s() {
    if [[ $DRY == 1 ]]; then echo 5; else case $1 in compiled) echo 120 ;; eager) echo 45 ;; *) echo 30 ;; esac; fi
}
# cap_s KIND: the most one item may take, so that a hung compile cannot eat the items after it.
cap_s() { case $1 in compiled) echo 260 ;; eager) echo 150 ;; tests) echo 120 ;; *) echo 90 ;; esac; }

mkdir -p "$RES"
STEPS=$RES/steps.tsv
if [[ $MODE == prepare ]]; then # a previous check's results stay
    STEPS=$RES/prepare.tsv
    rm -f "$STEPS"
else
    rm -rf "$RES"/summary.txt "$STEPS" "$RES"/pytest.log "$RES"/measured.txt "$RES"/bench-*
fi
exec > >(tee -a "$RES/gpu_check.log") 2>&1

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
CUT=()     # items the budget cut: never started
STOPPED=() # items stopped at their limit

# simulated KEY: the seconds GPU_CHECK_SIMULATE gives KEY (or *), empty if it runs for real.
simulated() {
    local item key secs star="" items
    IFS=', ' read -r -a items <<<"$SIMULATE" # not a word split: * would glob
    for item in "${items[@]}"; do
        key=${item%=*} secs=${item##*=}
        [[ $key == "$1" ]] && { echo "$secs"; return; }
        [[ $key == '*' ]] && star=$secs
    done
    echo "$star"
}

# step NAME KEY KIND COMMAND...: run COMMAND with a time limit of min(cap, budget left); record the
# result. Cut (not started) when less than the kind's minimum is left.
step() {
    local name=$1 key=$2 kind=$3
    shift 3
    local left=$((BUDGET - SECONDS - RESERVE)) cap need
    cap=$(cap_s "$kind") need=$(minimum_s "$kind")
    local limit=$((cap < left ? cap : left))
    ((left < 0)) && left=0
    if ((left < need)); then
        echo "== $name: CUT, ${left}s of the budget left, it needs >= ${need}s"
        printf '%s\tCUT: not started, %ss of the budget left (needs >= %ss)\t0\n' "$name" "$left" "$need" >>"$STEPS"
        CUT+=("$key")
        return 1
    fi
    local secs
    secs=$(simulated "$key")
    echo "== $name (limit ${limit}s, $((BUDGET - SECONDS))s of the budget left): ${secs:+simulated, sleep $secs instead of: }$*"
    if [[ -n $secs ]]; then
        set -- sleep "$secs"
        name="$name (simulated)"
    fi
    local t0=$SECONDS rc status
    timeout -k 10 "$limit" "$@"
    rc=$?
    case $rc in
    0) status=ok ;;
    124 | 137)
        status="TIMED OUT at ${limit}s"
        STOPPED+=("$key")
        ;;
    *) status="FAILED (exit $rc)" ;;
    esac
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" >>"$STEPS"
    echo "== $name: $status in $((SECONDS - t0))s"
    return "$rc"
}
note() { # note NAME STATUS: a step that ran no command
    echo "== $1: $2"
    printf '%s\t%s\t0\n' "$1" "$2" >>"$STEPS"
}

echo "== GPU check ($MODE) of $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?') on $(hostname 2>/dev/null || echo "?"), $(date -u +%FT%TZ), budget ${BUDGET}s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
if [[ -z $(simulated versions) ]]; then
    timeout 120 $PY -c 'import sys, torch, torchvision; print("python", sys.version.split()[0], "torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
fi

# dali: importable, or installed from wheel parts a developer machine was given (tests/gpu/README.md).
[[ -d /tmp/dali-site ]] && export PYTHONPATH="$PYTHONPATH:/tmp/dali-site"
install_dali() {
    mkdir -p /tmp/dali-whl &&
        cat /tmp/dali-parts/p? | tar xf - -C /tmp/dali-whl &&
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/dali-site /tmp/dali-whl/*.whl
}
if [[ -n $(simulated dali) ]]; then
    step dali dali other true
elif DALI_VERSION=$(timeout 120 $PY -c 'import nvidia.dali as d; print(d.__version__)' 2>/dev/null); then
    note dali "ok (DALI $DALI_VERSION)"
else
    if compgen -G '.dev/dali/p?' >/dev/null; then
        mkdir -p /tmp/dali-parts && cp -n .dev/dali/p? /tmp/dali-parts/
    fi
    if [[ $(compgen -G '/tmp/dali-parts/p?' | wc -l) -ge $DALI_PARTS ]]; then
        export -f install_dali
        export PY
        step dali dali other bash -c install_dali
        export PYTHONPATH="$PYTHONPATH:/tmp/dali-site"
    elif compgen -G '/tmp/dali-parts/p?' >/dev/null; then
        note dali "not yet: $(compgen -G '/tmp/dali-parts/p?' | wc -l) of the $DALI_PARTS wheel parts are here"
    else
        note dali "not available: nvidia.dali does not import (pip install nvidia-dali-cuda130); the dali rows will say so"
    fi
fi

# data: kept between runs, so that `prepare` makes it before the check's own time starts.
if [[ $(find "$DATA/train" -name '*.jpg' 2>/dev/null | wc -l) -ge $IMAGES ]]; then
    note data "ok (kept: $DATA holds $IMAGES images)"
else
    rm -rf "$DATA"
    step data data other $PY -m invasive_dist synth --out "$DATA" --n-train "$IMAGES" --n-test 8 --size "$SIZE" \
        --seed 0 --workers "$(nproc)"
fi

# toolchain: what torch.compile needs before its first kernel (Triton: a C compiler, as Triton picks
# it, and Python.h of this interpreter; Inductor on a CPU: a C++ compiler too).
toolchain_problem() {
    local cc=${CC:-$(command -v gcc || command -v clang || true)} inc
    [[ -n $cc ]] || { echo "no C compiler (gcc, clang or \$CC): install gcc"; return; }
    inc=$($PY -c 'import sysconfig as s; n = s.get_default_scheme(); print(s.get_paths("posix_prefix" if n == "posix_local" else n)["include"])' 2>/dev/null)
    [[ -f $inc/Python.h ]] || { echo "no Python.h in ${inc:-?}: install this Python's headers (python3-dev)"; return; }
    echo '#include <Python.h>' | timeout 60 "$cc" -x c -fsyntax-only -I"$inc" - 2>/dev/null ||
        { echo "$cc cannot compile against $inc/Python.h"; return; }
    if [[ $DRY == 1 ]] && ! command -v "${CXX:-g++}" >/dev/null; then
        echo "no C++ compiler (${CXX:-g++}) for Inductor on a CPU"
    fi
}
TOOLCHAIN=$(toolchain_problem)
if [[ -n $TOOLCHAIN ]]; then
    note toolchain "MISSING: $TOOLCHAIN; the compiled groups are not run"
else
    note toolchain "ok (a C compiler and Python.h for Triton)"
fi

if [[ $MODE == prepare ]]; then
    echo "== prepared in ${SECONDS}s: $(awk -F'\t' '{printf "%s%s: %s", (NR > 1 ? "; " : ""), $1, $2}' "$STEPS")"
    grep -q $'\tFAILED' "$STEPS" && exit 1
    exit 0
fi

# The plan. A bench item is one process per (model, compile mode), so a CUDA failure cannot take the
# others with it; bench itself does not start a row it does not expect to end within --time-limit-s
# (20 s under the kill: the process's start, torch's import and a DALI pipeline's teardown come on top
# of bench's own clock).
BENCH_ARGS=(--config configs/bench_r50.yaml --warmup 3 --steps 2 --windows 3 --window-s "$WINDOW_S")
BENCH_DIRS=()
bench_item() { # bench_item ARCH MODE BACKENDS DIR
    local arch=$1 mode=$2 backends=$3 dir=$4 compile=false args=() b left
    [[ $mode == compiled ]] && compile=true
    for b in ${backends//+/ }; do args+=(--backend "$b"); done
    left=$((BUDGET - SECONDS - RESERVE))
    local cap
    cap=$(cap_s "$mode")
    ((cap < left)) && left=$cap
    step "bench $arch $mode" "$arch:$mode" "$mode" $PY -m invasive_dist bench "${BENCH_ARGS[@]}" "${args[@]}" \
        --out "$dir" --time-limit-s $((left > 40 ? left - 20 : left / 2)) "data.root=$DATA" \
        "output.root=${TMPDIR:-/tmp}/invasive-dist-gpu-check-runs" "model.arch=$arch" "train.compile=$compile" \
        "${OVERRIDES[@]}"
}
for item in ${PLAN//,/ }; do
    if [[ $item == tests ]]; then
        # test_gpu_bench.py runs bench's CUDA path on a tiny model: the bench items measure it at scale.
        # shellcheck disable=SC2016 # $0, $1 and PIPESTATUS belong to the inner bash
        INVASIVE_DIST_GPU_MEASURED="$RES/measured.txt" step tests tests tests bash -c \
            '"$0" -m pytest -m gpu tests/gpu -q -p no:cacheprovider --ignore=tests/gpu/test_gpu_bench.py 2>&1 | tee "$1"; exit "${PIPESTATUS[0]}"' \
            "$PY" "$RES/pytest.log"
        continue
    fi
    IFS=: read -r arch mode backends <<<"$item"
    backends=${backends:-synthetic+gpu_cache+dali}
    if [[ $mode != eager && $mode != compiled ]]; then
        note "plan item $item" "not run: GPU_CHECK_PLAN takes tests or ARCH:eager[:B+B] or ARCH:compiled[:B+B]"
        continue
    fi
    dir=$RES/bench-$arch-$mode
    if [[ $mode == compiled && -n $TOOLCHAIN ]]; then
        note "bench $arch compiled" "not run: torch.compile needs $TOOLCHAIN"
        # Rows this group carries that no eager group of the plan has (the torch row) run eager instead.
        extra=()
        for b in ${backends//+/ }; do
            eager=0
            for other in ${PLAN//,/ }; do
                IFS=: read -r oarch omode obackends <<<"$other"
                [[ $oarch:$omode == "$arch:eager" && +${obackends:-synthetic+gpu_cache+dali}+ == *"+$b+"* ]] && eager=1
            done
            ((eager)) || extra+=("$b")
        done
        ((${#extra[@]})) || continue
        backends=$(
            IFS=+
            echo "${extra[*]}"
        ) mode=eager dir=$RES/bench-$arch-eager-$backends
    fi
    BENCH_DIRS+=("$dir")
    bench_item "$arch" "$mode" "$backends" "$dir"
done

# The table: each step's result (pytest's last count line for the tests), the GPU tests' measured
# values, every group's rows (a group that left no bench.json, or rows it did not reach, say so), and
# last what the budget cut or stopped.
label() { echo "${1//:/ }"; }
{
    echo "GPU check of $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u +%FT%TZ), ${SECONDS}s of a ${BUDGET}s budget"
    while IFS=$'\t' read -r name status secs; do
        extra=""
        if [[ $name == tests && -f $RES/pytest.log ]]; then
            extra=$(grep -E '[0-9]+ (passed|failed|error|skipped)' "$RES/pytest.log" | tail -n 1 | sed -E 's/^=+ *| *=+$//g')
        fi
        echo "step $name: $status (${secs} s)${extra:+: $extra}"
    done < <(cat "$STEPS" 2>/dev/null)
    if [[ -s $RES/measured.txt ]]; then
        echo
        echo "GPU tests' measured values (bounds nobody had measured):"
        cat "$RES/measured.txt"
    fi
    echo
    if compgen -G "$RES/bench-*/bench.json" >/dev/null; then
        timeout -k 10 60 $PY -m invasive_dist bench --summary "${BENCH_DIRS[@]}" 2>&1
    else
        echo "no bench results"
    fi
    if ((${#CUT[@]} + ${#STOPPED[@]})); then
        echo
        line="Not in this run:"
        ((${#STOPPED[@]})) && line+=" stopped at its time limit: $(for k in "${STOPPED[@]}"; do label "$k"; done | paste -sd, - | sed 's/,/, /g') (a bench's rows it did not reach say so above);"
        ((${#CUT[@]})) && line+=" cut by the ${BUDGET}s budget, never started: $(for k in "${CUT[@]}"; do label "$k"; done | paste -sd, - | sed 's/,/, /g');"
        echo "$line"
        again=""
        for item in ${PLAN//,/ }; do
            key=$(cut -d: -f1,2 <<<"$item")
            for k in "${CUT[@]}" "${STOPPED[@]}"; do [[ $k == "$key" ]] && again+="${again:+ }$item"; done
        done
        echo "run them alone with: GPU_CHECK_PLAN='$again' bash tests/gpu_check.sh"
    fi
} >"$RES/summary.txt"
echo
cat "$RES/summary.txt"
echo "results in $RES (gpu_check.log, summary.txt, bench-*/bench.json, pytest.log, measured.txt)"
grep -q $'\tFAILED' "$STEPS" 2>/dev/null && exit 1
exit 0

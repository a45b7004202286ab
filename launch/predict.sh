#!/usr/bin/env bash
# Predict a test set under torchrun (test images are sharded over the processes; the main process
# writes RUN/submission.csv, or --out). Prints the command, then runs it.
#
#   launch/predict.sh --run-dir runs/demo --data data/synthetic
#   launch/predict.sh -n 8 --run-dir runs/r50 --data /data/invasive predict.tta=dihedral
set -euo pipefail

PROG=launch/predict.sh
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
    cat <<USAGE
Usage: $PROG [-n NPROC | --gpus N] [--nnodes M --node-rank R --master ADDR:PORT] [--dry-run]
             --run-dir RUN_DIR --data DATA_DIR [--out FILE] [key.path=value ...]

Runs: torchrun ... -m invasive_dist predict --run-dir RUN_DIR --data DATA_DIR [--out FILE] key.path=value ...

  -n, --nproc, --gpus N   processes on this node (default: the GPUs nvidia-smi -L lists, 1 without)
  --nnodes M, --node-rank R, --master ADDR:PORT   several nodes (see launch/train.sh --help)
  --run-dir RUN_DIR       a training run or CV directory (--run works too)
  --data DATA_DIR         data folder with test/ and sample_submission.csv
  --out FILE              submission path (default RUN_DIR/submission.csv)
  --dry-run               print the command without running it
USAGE
}

# shellcheck source=launch/common.sh
source "$REPO/launch/common.sh"

RUN=""
DATA=""
OUT=""
ARGS=()
# Take --run/--data/--out out first; the launcher options and overrides remain.
while (($#)); do
    case $1 in
        --run | --run-dir | --data | --out)
            (($# >= 2)) || die "$1 needs a value"
            case $1 in --run | --run-dir) RUN=$2 ;; --data) DATA=$2 ;; --out) OUT=$2 ;; esac
            shift 2
            ;;
        --run=* | --run-dir=* | --data=* | --out=*)
            case $1 in --run=* | --run-dir=*) RUN=${1#*=} ;; --data=*) DATA=${1#*=} ;; --out=*) OUT=${1#*=} ;; esac
            shift
            ;;
        *)
            ARGS+=("$1")
            shift
            ;;
    esac
done
parse_launch_args "${ARGS[@]}"
[[ -z $CONFIG_OPT ]] || die "--config: predict reads the run's own config (RUN_DIR/config.yaml); change settings with key.path=value"
[[ -n $RUN ]] || die "missing --run-dir RUN_DIR (a training run directory)"
[[ -n $DATA ]] || die "missing --data DATA_DIR (a folder with test/ and sample_submission.csv)"
[[ -d $RUN ]] || die "--run-dir '$RUN' is not a directory (a training run or CV directory)"
[[ -d $DATA ]] || die "--data '$DATA' is not a directory"
for ov in "${REST[@]}"; do
    [[ $ov == *=* ]] || die "unexpected argument '$ov' (overrides are key.path=value, e.g. predict.tta=flips)"
done

build_torchrun
ARGS=(--data "$DATA")
if [[ -n $OUT ]]; then ARGS+=(--out "$OUT"); fi
# torchrun's own argument parser sees every argument and rejects `--run` as an ambiguous
# abbreviation of its --run-path, so the run directory goes as --run-dir.
check_python
run_cmd "${TORCHRUN_CMD[@]}" -m invasive_dist predict --run-dir "$RUN" "${ARGS[@]}" "${REST[@]}"

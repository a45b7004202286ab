#!/usr/bin/env bash
# Train under torchrun on this node (or one node of several); prints the command, then runs it.
#
#   launch/train.sh configs/demo.yaml                       # one process per GPU (1 on CPU)
#   launch/train.sh -n 4 configs/demo.yaml train.epochs=3   # 4 processes, dotted overrides
#   # two nodes, run on each (node-rank 0 on node001):
#   launch/train.sh --nnodes 2 --node-rank 0 --master node001:29500 configs/r50.yaml
#   launch/train.sh --nnodes 2 --node-rank 1 --master node001:29500 configs/r50.yaml
#   # elastic: go on with 1 node when the other is lost (see launch/README.md for what it covers):
#   launch/train.sh --nnodes 1:2 --max-restarts 3 --node-rank R --master node001:29500 configs/r50.yaml train.grad_accum=auto
#
# Exit status: the training's (0; 2 for a user error such as a bad config key, printed once per
# node; 1 when a peer was lost, with a message naming it and the command that continues; 143 after
# a SIGTERM/SIGUSR1 made it save and stop; torchrun itself reports 1 when it was signalled).
set -euo pipefail

PROG=launch/train.sh
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
    cat <<USAGE
Usage: $PROG [-n NPROC | --gpus N] [--nnodes M|MIN:MAX --node-rank R --master ADDR:PORT]
             [--max-restarts K] [--dry-run]
             CONFIG [key.path=value ...]        (or --config CONFIG)

Runs: torchrun ... -m invasive_dist train --config CONFIG key.path=value ...

  -n, --nproc, --gpus N   processes on this node (default: the GPUs nvidia-smi -L lists, 1 without)
  --nnodes M              nodes in the job (default 1: torchrun --standalone)
  --nnodes MIN:MAX        elastic: any MIN..MAX nodes; with --max-restarts, the nodes left after a
                          lost one re-form the job and resume (use train.grad_accum=auto)
  --node-rank R           this node, 0..M-1 (0 on the node that --master names)
  --master ADDR:PORT      c10d rendezvous endpoint on node-rank 0 (multi-node only)
  --max-restarts K        torchrun restarts this node's workers up to K times after a failure
  --dry-run               print the command without running it
Environment: TORCHRUN (torchrun executable), RDZV_ID (rendezvous id, default invasive-dist).
USAGE
}

# shellcheck source=launch/common.sh
source "$REPO/launch/common.sh"

parse_launch_args "$@"
if [[ -n $CONFIG_OPT ]]; then # --config FILE, as the other commands take it
    CONFIG=$CONFIG_OPT
    OVERRIDES=("${REST[@]}")
else
    ((${#REST[@]} >= 1)) || die "missing CONFIG (a YAML file such as configs/demo.yaml)"
    CONFIG=${REST[0]}
    OVERRIDES=("${REST[@]:1}")
fi
[[ -f $CONFIG ]] || die "CONFIG '$CONFIG' is not a file"
for ov in "${OVERRIDES[@]}"; do
    [[ $ov == *=* ]] || die "override '$ov' is not of the form key.path=value (e.g. train.epochs=3)"
done

build_torchrun
check_python
run_cmd "${TORCHRUN_CMD[@]}" -m invasive_dist train --config "$CONFIG" "${OVERRIDES[@]}"

# shellcheck shell=bash
# Shared by launch/train.sh and launch/predict.sh (sourced, not run): launcher options -> torchrun.
#
# Parses   [-n NPROC | --gpus N] [--nnodes M|MIN:MAX --node-rank R --master ADDR:PORT]
#          [--max-restarts K] [--dry-run] [--config FILE]
# and builds the torchrun part of the command line in the array TORCHRUN_CMD:
#   one node:    torchrun --standalone --nnodes=1 --nproc_per_node=N
#   M nodes:     torchrun --nnodes=M --node_rank=R --nproc_per_node=N --rdzv_backend=c10d
#                         --rdzv_endpoint=ADDR:PORT --rdzv_id=$RDZV_ID --rdzv_conf=is_host=<R==0>
#   elastic:     --nnodes=MIN:MAX (and --max_restarts=K): the job runs on any MIN..MAX nodes and
#                re-forms (restarts every worker) when one is lost, up to K times
# With c10d the rendezvous numbers the nodes; node-rank 0 hosts the rendezvous store (is_host), so
# ADDR must be an address of node-rank 0 that the other nodes can reach.

die() {
    echo "$PROG: error: $*" >&2
    echo "Try '$PROG --help'." >&2
    exit 2
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

# Processes per node when -n/--gpus is not given: one per visible GPU, else 1 (CPU).
default_nproc() {
    local n=0
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} && ${CUDA_VISIBLE_DEVICES} != "-1" ]]; then
        IFS=, read -r -a _devs <<<"$CUDA_VISIBLE_DEVICES"
        n=${#_devs[@]}
    elif command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    fi
    if ((n < 1)); then n=1; fi
    echo "$n"
}

# The torchrun executable: $TORCHRUN, else torchrun on PATH, else the repository's .venv. With
# --dry-run and none found, the plain name: the command is printed, not run.
find_torchrun() {
    if [[ -n ${TORCHRUN:-} ]]; then
        echo "$TORCHRUN"
    elif command -v torchrun >/dev/null 2>&1; then
        command -v torchrun
    elif [[ -x $REPO/.venv/bin/torchrun ]]; then
        echo "$REPO/.venv/bin/torchrun"
    elif ((DRY_RUN)); then
        echo "$PROG: note: torchrun is not on PATH here; activate the environment before running this" >&2
        echo torchrun
    else
        die "torchrun not found: activate the environment that has torch, or set TORCHRUN=/path/to/torchrun"
    fi
}

# check_python: the Python next to torchrun must import this repository's invasive_dist and its
# dependencies; a torchrun from another environment fails here with the cause, not in every worker.
check_python() {
    ((DRY_RUN)) && return 0
    local py err
    py=$(dirname "${TORCHRUN_CMD[0]}")/python
    [[ -x $py ]] || return 0 # torchrun without a python beside it (a wrapper): let it run
    if ! err=$(PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$py" -c "import torch, accelerate, invasive_dist.cli" 2>&1); then
        die "$py (the Python of ${TORCHRUN_CMD[0]}) cannot import invasive_dist: ${err##*$'\n'}. Wrong Python environment: activate the project's (source .venv/bin/activate) or set TORCHRUN=.venv/bin/torchrun"
    fi
}

NPROC=""
NNODES=1
MIN_NODES="" # --nnodes MIN:MAX (elastic); NNODES is then MAX
MAX_RESTARTS=""
NODE_RANK=""
MASTER=""
DRY_RUN=0
CONFIG_OPT="" # --config FILE (launch/train.sh)
REST=()

# parse_launch_args "$@": consumes the launcher options, leaves everything else in REST (in order).
parse_launch_args() {
    local opt val
    while (($#)); do
        opt=$1
        val=""
        case $opt in
            --*=*)
                val=${opt#*=}
                opt=${opt%%=*}
                ;;
        esac
        case $opt in
            -h | --help)
                usage
                exit 0
                ;;
            -n | --nproc | --nproc-per-node | --gpus | --nnodes | --node-rank | --master | --max-restarts)
                if [[ -z $val ]]; then
                    (($# >= 2)) || die "$opt needs a value"
                    val=$2
                    shift
                fi
                case $opt in
                    --nnodes)
                        if [[ $val =~ ^([0-9]+):([0-9]+)$ ]]; then # elastic: MIN:MAX
                            MIN_NODES=$((10#${BASH_REMATCH[1]}))
                            val=${BASH_REMATCH[2]}
                            if ((MIN_NODES < 1 || MIN_NODES > 10#$val)); then die "--nnodes: '$MIN_NODES:$val' needs 1 <= MIN <= MAX"; fi
                        fi
                        if ! is_uint "$val" || ((10#$val < 1)); then die "--nnodes: '$val' is not a positive integer or MIN:MAX"; fi
                        NNODES=$((10#$val))
                        ;;
                    --max-restarts)
                        is_uint "$val" || die "--max-restarts: '$val' is not a non-negative integer"
                        MAX_RESTARTS=$val
                        ;;
                    --node-rank)
                        is_uint "$val" || die "--node-rank: '$val' is not a non-negative integer"
                        NODE_RANK=$val
                        ;;
                    --master)
                        [[ $val =~ ^[^:]+:[0-9]+$ ]] || die "--master: '$val' is not ADDR:PORT (e.g. node001:29500)"
                        MASTER=$val
                        ;;
                    *)
                        if ! is_uint "$val" || ((10#$val < 1)); then die "$opt: '$val' is not a positive integer"; fi
                        NPROC=$val
                        ;;
                esac
                ;;
            --dry-run)
                DRY_RUN=1
                ;;
            --config)
                # What every invasive-dist command takes: the same as CONFIG in first position.
                if [[ -z $val ]]; then
                    (($# >= 2)) || die "--config needs a value (a YAML file such as configs/demo.yaml)"
                    val=$2
                    shift
                fi
                [[ -z $CONFIG_OPT ]] || die "--config given twice"
                CONFIG_OPT=$val
                ;;
            --)
                shift
                REST+=("$@")
                return 0
                ;;
            -?*)
                # Anything else that looks like an option and comes before the positional arguments.
                if ((${#REST[@]} == 0)); then
                    die "unknown option '$1'"
                fi
                REST+=("$1")
                ;;
            *)
                REST+=("$1")
                ;;
        esac
        shift
    done
}

# build_torchrun: validates the node options and fills TORCHRUN_CMD (read by the caller).
# shellcheck disable=SC2034
build_torchrun() {
    [[ -n $NPROC ]] || NPROC=$(default_nproc)
    local torchrun
    torchrun=$(find_torchrun)
    if ((NNODES == 1)); then
        [[ -z $MASTER && -z $NODE_RANK ]] || die "--master/--node-rank need --nnodes > 1 (one node runs standalone)"
        TORCHRUN_CMD=("$torchrun" --standalone --nnodes=1 "--nproc_per_node=$NPROC")
    else
        [[ -n $MASTER ]] || die "--nnodes $NNODES needs --master ADDR:PORT (an address of node-rank 0)"
        [[ -n $NODE_RANK ]] || die "--nnodes $NNODES needs --node-rank R (0 on the node that --master names)"
        ((10#$NODE_RANK < NNODES)) || die "--node-rank $NODE_RANK must be below --nnodes $NNODES"
        local is_host=false
        if ((10#$NODE_RANK == 0)); then is_host=true; fi
        TORCHRUN_CMD=("$torchrun" "--nnodes=${MIN_NODES:+$MIN_NODES:}$NNODES" "--node_rank=$NODE_RANK"
            "--nproc_per_node=$NPROC" --rdzv_backend=c10d "--rdzv_endpoint=$MASTER"
            "--rdzv_id=${RDZV_ID:-invasive-dist}" "--rdzv_conf=is_host=$is_host")
    fi
    if [[ -n $MAX_RESTARTS ]]; then TORCHRUN_CMD+=("--max_restarts=$MAX_RESTARTS"); fi
}

# run_cmd TORCHRUN ARGS...: prints the torchrun command (shell-quoted), then replaces this shell with
# it, run through launch/agent.py by the Python beside torchrun: torchrun's own main in that process,
# plus the exit code a worker already explained (2 for a user error) without torchrun's banner, and
# an agent that does not wait on an unreachable rendezvous store long after its workers ended.
run_cmd() {
    printf '+' >&2
    printf ' %q' "$@" >&2
    printf '\n' >&2
    if ((DRY_RUN)); then exit 0; fi
    # The repository's package wins over an installed copy, whatever the working directory.
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    # Workers restarted by torchrun (--max-restarts) otherwise read the previous attempt's
    # addresses from the agent's shared store and fail to connect (pytorch/pytorch#135712).
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
    local py
    py=$(dirname "$1")/python
    if [[ -x $py && -f $REPO/launch/agent.py ]]; then
        exec "$py" "$REPO/launch/agent.py" "${@:2}"
    fi
    exec "$@" # a torchrun without a Python beside it (a wrapper): as it is
}

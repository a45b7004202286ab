# shellcheck shell=bash
# Shared by slurm/train.sbatch, slurm/cv_array.sbatch and slurm/predict.sbatch (sourced inside the
# job): the Python environment, the world (nodes x processes, GPU or CPU mode), one torchrun agent
# per node through srun, and the signal handling that turns Slurm's warnings into a checkpoint and
# a requeue.
#
# Variables the job may set before sbatch (sbatch exports the submitting shell's environment):
#   NPROC_PER_NODE   processes per node (default: GPUs allocated per node; 2 in CPU mode)
#   MASTER_PORT      c10d rendezvous port (default 20000 + job id % 20000)
#   MASTER_ADDR      rendezvous host (default: the first node of the allocation)
#   PYTHON_ENV       a virtual environment to activate (default: torchrun from PATH, else REPO/.venv)

job_log() { echo "[${JOB_SCRIPT:-slurm} $(date +%T)] $*"; }
job_die() {
    echo "[${JOB_SCRIPT:-slurm}] error: $*" >&2
    exit 2
}

# job_setup_env: the Python environment and NCCL defaults. Needs REPO.
job_setup_env() {
    if [[ -n ${PYTHON_ENV:-} ]]; then
        [[ -f $PYTHON_ENV/bin/activate ]] || job_die "PYTHON_ENV=$PYTHON_ENV has no bin/activate"
        # shellcheck disable=SC1091
        source "$PYTHON_ENV/bin/activate"
    elif ! command -v torchrun >/dev/null && [[ -f $REPO/.venv/bin/activate ]]; then
        # shellcheck disable=SC1091
        source "$REPO/.venv/bin/activate"
    fi
    command -v torchrun >/dev/null ||
        job_die "torchrun not found: activate the environment before sbatch, or set PYTHON_ENV=/path/to/venv"
    # The repository's package, whatever is installed.
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    # NCCL: see the comments in slurm/train.sbatch. A rank whose collective fails or times out
    # (dist.timeout_s) aborts instead of hanging the job until its time limit.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
}

# job_world: sets NNODES, NPROC, MODE, MASTER_ADDR, MASTER_PORT from the allocation.
job_world() {
    # GPUs per node as allocated: --gpus-per-node=8 or =a100:8 sets SLURM_GPUS_PER_NODE; --gres=gpu:8
    # sets SLURM_GPUS_ON_NODE / SLURM_JOB_GPUS (the indices, "0,1,...") instead.
    local gpus=${SLURM_GPUS_PER_NODE:-}
    gpus=${gpus##*:} # "a100:8" -> 8
    if ! [[ $gpus =~ ^[0-9]+$ ]]; then
        if [[ ${SLURM_GPUS_ON_NODE:-} =~ ^[0-9]+$ ]]; then
            gpus=$SLURM_GPUS_ON_NODE
        elif [[ -n ${SLURM_JOB_GPUS:-} ]]; then
            local ids
            IFS=, read -r -a ids <<<"$SLURM_JOB_GPUS"
            gpus=${#ids[@]}
        else
            gpus=0
        fi
    fi
    if ((gpus > 0)); then
        NPROC=${NPROC_PER_NODE:-$gpus}
        MODE="$gpus GPU(s) per node, NCCL"
    else
        NPROC=${NPROC_PER_NODE:-2}
        MODE="CPU mode (no GPUs allocated), gloo"
    fi
    [[ $NPROC =~ ^[1-9][0-9]*$ ]] || job_die "NPROC_PER_NODE='$NPROC' is not a positive integer"
    NNODES=${SLURM_NNODES:-1}
    MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}
    # One port per job id, so that jobs sharing a node do not collide.
    MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
}

JOB_GOT_SIGNAL=""
JOB_REQUEUE_ON_USR1=1

# shellcheck disable=SC2317  # called by the traps
job_on_signal() {
    # A SIGTERM after SIGUSR1 (the time limit itself) must not cancel the requeue.
    [[ $JOB_GOT_SIGNAL == USR1 ]] || JOB_GOT_SIGNAL=$1
    if [[ $1 == USR1 ]]; then
        # The time limit is near: SIGTERM to the job steps (the torchrun agents pass it to their
        # workers; this shell is not signalled). The ranks agree to stop at the next step boundary,
        # save checkpoints/last.pt and exit 143.
        job_log "SIGUSR1 (time limit near): sending SIGTERM to the training so that it saves at a step boundary"
        scancel --signal=TERM "$SLURM_JOB_ID" || true
    else
        # scancel, `scontrol requeue`, preemption, the time limit: Slurm signals every step itself.
        # Sending another SIGTERM would interrupt torchrun's orderly shutdown, so only wait.
        job_log "SIG$1: Slurm is stopping the job; waiting for the training to save"
    fi
}

# job_torchrun SUBCOMMAND ARGS...: srun one torchrun agent per node running
# `python -m invasive_dist SUBCOMMAND ARGS...`; waits for it through signals; on SIGUSR1 requeues
# the job. Returns (as JOB_RC) the step's exit code.
job_torchrun() {
    local sub=$1
    shift
    job_log "job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST}"
    job_log "$NNODES node(s) x $NPROC process(es), $MODE; c10d rendezvous at $MASTER_ADDR:$MASTER_PORT"
    job_log "+ srun --nodes=$NNODES --ntasks-per-node=1 torchrun --nnodes=$NNODES --nproc_per_node=$NPROC" \
        "--rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT --rdzv_id=$SLURM_JOB_ID" \
        "-m invasive_dist $sub $*"
    # Evaluated on each node by the bash that srun starts there: the first node of the allocation
    # (SLURM_NODEID 0) hosts the c10d store, without relying on its name matching the host's own.
    # shellcheck disable=SC2016
    # torchrun runs through launch/agent.py (as launch/train.sh runs it): a worker's own exit code
    # (2 for a user error, printed once per node) instead of torchrun's 1 and its banner, and an
    # agent that does not wait on a rendezvous store that is gone.
    local agent='py=$(dirname "$(command -v torchrun)")/python
        run=(torchrun)
        if [[ -x $py && -f $2/launch/agent.py ]]; then run=("$py" "$2/launch/agent.py"); fi
        exec "${run[@]}" --nnodes="$SLURM_NNODES" --nproc_per_node="$0" \
        --rdzv_backend=c10d --rdzv_endpoint="$1" --rdzv_id="$SLURM_JOB_ID" \
        --rdzv_conf=is_host=$([[ $SLURM_NODEID == 0 ]] && echo true || echo false) \
        -m invasive_dist "${@:3}"'
    trap 'job_on_signal USR1' USR1
    trap 'job_on_signal TERM' TERM
    # --cpus-per-task: the step gets every CPU of the node (data-loading workers), not Slurm's 1.
    srun --nodes="$NNODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" \
        --kill-on-bad-exit=1 \
        bash -c "$agent" "$NPROC" "$MASTER_ADDR:$MASTER_PORT" "$REPO" "$sub" "$@" &
    local pid=$!
    # `wait` returns early when a trapped signal arrives; wait again until srun itself has ended.
    while :; do
        if wait "$pid"; then JOB_RC=0; else JOB_RC=$?; fi
        kill -0 "$pid" 2>/dev/null || break
    done
    job_log "srun step (torchrun) ended with exit code $JOB_RC"
    # Requeue after the time-limit warning, unless the work finished in the meantime.
    if [[ $JOB_GOT_SIGNAL == USR1 && $JOB_REQUEUE_ON_USR1 == 1 && $JOB_RC != 0 ]]; then
        job_log "requeueing job $SLURM_JOB_ID; it continues from its last checkpoint"
        scontrol requeue "$SLURM_JOB_ID"
    fi
}

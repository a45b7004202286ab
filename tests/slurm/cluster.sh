#!/usr/bin/env bash
# A real single-node Slurm on this machine, for the Slurm integration tests (and for trying
# slurm/*.sbatch by hand). Needs root; works without systemd (CI containers, Debian 12).
#
#   tests/slurm/start.sh     # = cluster.sh start: install (when missing) and start munged, slurmctld,
#                            #   slurmd; returns when the node accepts jobs (CI: .ci/run calls it)
#   tests/slurm/stop.sh      # = cluster.sh stop: stop the three daemons (by their pid files)
#   tests/slurm/cluster.sh status   # exit 0 when the node is up and accepting jobs
#
# start is idempotent: daemons already running are left alone, and it returns once `sinfo` shows
# the node idle (about 6 s from nothing installed, plus the package download). Packages:
# `apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge` (8 packages,
# about 3 MB), Slurm 22.05 on Debian 12.
#
# The cluster: one node named $(hostname -s) with CPUs=$(nproc), partition "debug", no GPUs (a job
# asking for --gpus would pend forever; slurm/train.sbatch has a CPU mode), processes tracked by
# process group (proctrack/pgid: no cgroup setup needed), and settings that make tests fast:
# AuthInfo=cred_expire=10 and SchedulerParameters=sched_interval=2,bf_interval=2 (a requeued job
# restarts after about 12 s instead of about 170 s), and MinJobAge=16 (`sbatch --wait` polls every
# 2, 8, 32 s while the poll interval is below MinJobAge/2: with 16 it polls every 8 s instead of
# every 32 s; a finished job stays visible to scontrol for 16 s). See shared/design/SLURM-IN-CI.md.
#
# /etc/slurm/slurm.conf is written only when it is missing or was written by this script (it
# carries the marker line below): a real cluster's configuration is never touched.
#
# Environment: SLURM_TEST_WAIT (seconds to wait for each daemon, default 60).
set -euo pipefail

PROG=tests/slurm/cluster.sh
MARKER="# written by invasive-dist tests/slurm/cluster.sh"
CONF=/etc/slurm/slurm.conf
RUN_DIR=/run/slurm
LOG_DIR=/var/log/slurm
CTLD_PID=$RUN_DIR/slurmctld.pid
SLURMD_PID=$RUN_DIR/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
WAIT=${SLURM_TEST_WAIT:-60}
NODE=$(hostname -s)

log() { echo "[$PROG] $*" >&2; }
fail() {
    echo "[$PROG] error: $*" >&2
    exit 1
}

alive() { # alive PIDFILE: the process named in PIDFILE runs
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

wait_for() { # wait_for WHAT COMMAND...: poll COMMAND (0.2 s) until it succeeds or WAIT passes
    local what=$1 deadline=$((SECONDS + WAIT))
    shift
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "timed out after ${WAIT}s waiting for $what"
            return 1
        fi
        sleep 0.2
    done
}

install_packages() {
    local missing=()
    [[ -x /usr/sbin/slurmctld ]] || missing+=(slurmctld)
    [[ -x /usr/sbin/slurmd ]] || missing+=(slurmd)
    command -v sbatch >/dev/null 2>&1 || missing+=(slurm-client)
    [[ -x /usr/sbin/munged ]] || missing+=(munge)
    ((${#missing[@]} == 0)) && return 0
    command -v apt-get >/dev/null 2>&1 || fail "missing ${missing[*]} and no apt-get to install them"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # The package lists may be absent (fresh image) or stale (404s): update once and retry.
    if ! apt-get install -y --no-install-recommends "${missing[@]}" >/tmp/slurm-apt.log 2>&1; then
        apt-get update >>/tmp/slurm-apt.log 2>&1 || true
        apt-get install -y --no-install-recommends "${missing[@]}" >>/tmp/slurm-apt.log 2>&1 ||
            fail "apt-get install ${missing[*]} failed; see /tmp/slurm-apt.log"
    fi
}

write_config() {
    if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
        fail "$CONF exists and was not written by this script; refusing to replace a real cluster's configuration"
    fi
    mkdir -p /etc/slurm "$RUN_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
    local tmp
    tmp=$(mktemp "$CONF.XXXXXX")
    cat >"$tmp" <<EOF
$MARKER
# A one-node test cluster (see the script for why each setting is here).
ClusterName=invasive-test
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=16
KillWait=30
Waittime=0
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=$NODE CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    if [[ -f $CONF ]] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        return 1 # unchanged
    fi
    chmod 0644 "$tmp"
    mv "$tmp" "$CONF"
    return 0 # changed
}

start_munge() {
    if alive "$MUNGE_PID"; then return 0; fi
    local key=/etc/munge/munge.key
    if [[ ! -s $key ]]; then
        log "creating $key"
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile="$key" --force
        else
            dd if=/dev/urandom of="$key" bs=1 count=1024 status=none
        fi
    fi
    chown munge:munge "$key" /etc/munge
    chmod 0400 "$key"
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
    wait_for "munged" bash -c 'munge -n | unmunge' || fail "munged did not start (see /var/log/munge/munged.log)"
}

node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n1; }

node_usable() { [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]]; }

start() {
    [[ $(id -u) == 0 ]] || fail "needs root (it installs packages and starts daemons as root)"
    install_packages
    local changed=0
    if write_config; then changed=1; fi
    start_munge
    if ((changed)) && { alive "$CTLD_PID" || alive "$SLURMD_PID"; }; then
        log "slurm.conf changed: restarting the Slurm daemons"
        stop_slurm
    fi
    if ! alive "$CTLD_PID"; then
        log "starting slurmctld"
        # -c: a test cluster starts with no jobs left over from an earlier run.
        /usr/sbin/slurmctld -c
    fi
    wait_for "slurmctld (scontrol ping)" bash -c 'scontrol ping | grep -q "UP"' ||
        fail "slurmctld did not come up; see $LOG_DIR/slurmctld.log"
    if ! alive "$SLURMD_PID"; then
        log "starting slurmd"
        /usr/sbin/slurmd
    fi
    if ! wait_for "node $NODE to be idle" node_usable; then
        # A node left down or drained by an earlier run: return it to service once.
        scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
        wait_for "node $NODE to be idle" node_usable ||
            fail "node $NODE is '$(node_state)'; see $LOG_DIR/slurmd.log and 'scontrol show node $NODE'"
    fi
    log "Slurm is up: node $NODE ($(nproc) CPUs, partition debug). Stop it with: tests/slurm/stop.sh"
}

stop_pidfile() { # stop_pidfile NAME PIDFILE
    local pid
    alive "$2" || return 0
    pid=$(cat "$2")
    log "stopping $1 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

stop_slurm() {
    stop_pidfile slurmd "$SLURMD_PID"
    stop_pidfile slurmctld "$CTLD_PID"
}

stop() {
    stop_slurm
    stop_pidfile munged "$MUNGE_PID"
}

status() {
    alive "$MUNGE_PID" || fail "munged is not running"
    alive "$CTLD_PID" || fail "slurmctld is not running"
    alive "$SLURMD_PID" || fail "slurmd is not running"
    node_usable || fail "node $NODE is '$(node_state)'"
    echo "up: node $NODE is $(node_state)"
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *)
        echo "Usage: $PROG start|stop|status" >&2
        exit 2
        ;;
esac

#!/usr/bin/env bash
# Start a real single-node Slurm on this machine (root; installs the Debian packages when missing).
# Idempotent. See tests/slurm/cluster.sh.
exec bash "$(dirname "${BASH_SOURCE[0]}")/cluster.sh" start

#!/usr/bin/env bash
# Stop the test Slurm started by tests/slurm/start.sh. See tests/slurm/cluster.sh.
exec bash "$(dirname "${BASH_SOURCE[0]}")/cluster.sh" stop

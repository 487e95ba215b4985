#!/usr/bin/env bash
# test-slurm.sh - `make test-slurm`: run the tiny workflow through the SLURM executor on a
# single-node SLURM cluster on localhost and check what SLURM saw (tests/workflow/test_slurm.py).
#
# Starts the cluster itself (installing the Debian packages on a fresh machine, so CI needs
# root or passwordless sudo), and stops it again at the end unless it was already running
# before this script started (then it is left as found). Everything is time-bounded:
# the Snakemake SLURM plugin can poll forever when job status is unavailable.
#
# Environment:
#   PYTHON                 interpreter with the package + snakemake (default: .venv/bin/python)
#   SLURM_TEST_TIMEOUT     seconds for the whole pytest run (default 1800)
#   KEEP_SLURM=1           leave the cluster running afterwards (to inspect sacct, logs)
#   PYTEST_ARGS            extra pytest arguments (e.g. "-k second_run")

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
TIMEOUT=${SLURM_TEST_TIMEOUT:-1800}
# the account the start script creates and the profile reads from the environment
export SLURM_ACCOUNT=${SLURM_TEST_ACCOUNT:-pruning}
export SLURM_ACCOUNTS=$SLURM_ACCOUNT
export GPU_TYPE=${GPU_TYPE:-a100}

log() { printf '[test-slurm] %s\n' "$*" >&2; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { log "needs root (or sudo) to start the local cluster"; exit 1; }
    SUDO="sudo -E"
fi

was_running=0
if command -v scontrol >/dev/null && timeout 5 scontrol ping 2>/dev/null | grep -q UP; then
    was_running=1
fi

cleanup() {
    local rc=$?
    if [ "${KEEP_SLURM:-0}" = 1 ]; then
        log "KEEP_SLURM=1: cluster left running (stop: $SUDO $HERE/stop-local-slurm.sh)"
    elif [ "$was_running" = 1 ]; then
        log "cluster was running before this test: left running"
    else
        $SUDO bash "$HERE/stop-local-slurm.sh" || log "stop-local-slurm.sh failed"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# SLURM_USER_FOR_ACCOUNTS: the user who submits (sudo would otherwise make it root)
SLURM_USER_FOR_ACCOUNTS=$(id -un) $SUDO bash "$HERE/start-local-slurm.sh"

cd "$ROOT"
log "running tests/workflow/test_slurm.py (timeout ${TIMEOUT}s)"
# REQUIRE_SLURM turns "no cluster" skips into failures: here the cluster must be there.
# shellcheck disable=SC2086
DENOISEROTATOR_REQUIRE_SLURM=1 timeout -k 30 "$TIMEOUT" \
    "$PYTHON" -m pytest -m slurm tests/workflow/test_slurm.py -v -p no:cacheprovider ${PYTEST_ARGS:-}

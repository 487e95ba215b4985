#!/usr/bin/env bash
# start-local-slurm.sh - start a single-node SLURM cluster on localhost for CI/tests
# (used by .ci/slurm/test-slurm.sh, i.e. `make test-slurm`).
#
# Adapted from the reference recipe in ../shared/recipes/local-slurm; what it
# teaches about SLURM 22.05 + snakemake-executor-plugin-slurm 2.8.0 is in
# ../shared/notes/slurm-local.md.
#
# Target: Debian 12 (bookworm), run as root, no systemd needed (daemons are
# started directly). Idempotent: packages are installed only if missing,
# configs are (re)written, daemons that are already running are left alone,
# and the script returns once the node is idle and a smoke-test job ran.
#
# What you get (defaults):
#   * SLURM 22.05 (Debian packages) with slurmctld + slurmd on 127.0.0.1
#   * one node "$(hostname -s)" with all CPUs, RealMemory = detected - 2 GiB, and three
#     partitions on it: "debug" (default, MaxTime=INFINITE), "gpu" (MaxTime=INFINITE) and
#     "short" (MaxTime=$SHORT_MAX_TIME minutes), so tests can route jobs by kind and make one
#     exceed its time limit
#   * memory limits enforced without cgroups: jobacct_gather polls every step's RSS and
#     OverMemoryKill ends a step above its --mem (state OUT_OF_MEMORY)
#   * FAKE_GPUS fake GPUs (gres gpu:a100) backed by dummy char devices, so
#     jobs asking for `--gpus=1`, `--gres=gpu:1` or `--gres=gpu:a100:1` schedule
#   * SLURM_ACCOUNTING=1: slurmdbd + MariaDB (unix socket only, no TCP), so
#     `sacct` works exactly as on a production cluster (Snakemake's SLURM
#     executor uses `sacct` for job status by default). Accounts in
#     SLURM_ACCOUNTS are created and the invoking user is added to them.
#     SLURM_ACCOUNTING=0: no database (faster, fewer packages); `sacct` then
#     fails with "Slurm accounting storage is disabled", so the Snakemake
#     profile MUST set `slurm-status-command: squeue`.
#
# Usage:   sudo .ci/slurm/start-local-slurm.sh   (env vars below to customise)
# Stop:    sudo .ci/slurm/stop-local-slurm.sh    (kills only what this started)
#
# Network: every daemon talks to 127.0.0.1 only; MariaDB has networking off.
# (slurmctld/slurmd/slurmdbd listen on 0.0.0.0:6817-6819 - SLURM 22.05 has no
# bind-address option - but all configured peers are 127.0.0.1.)

set -euo pipefail

# ----------------------------------------------------------------- settings --
SLURM_ACCOUNTING="${SLURM_ACCOUNTING:-1}"      # 1 = slurmdbd+MariaDB, 0 = none
SLURM_ACCOUNTS="${SLURM_ACCOUNTS:-pruning}"    # accounts to create (comma/space)
SLURM_USER_FOR_ACCOUNTS="${SLURM_USER_FOR_ACCOUNTS:-${SUDO_USER:-root}}"
FAKE_GPUS="${FAKE_GPUS:-2}"                    # 0 = no GRES at all
GPU_TYPE="${GPU_TYPE:-a100}"                   # gres type, e.g. a100 -> gpu:a100:1
PARTITION="${PARTITION:-debug}"
SHORT_MAX_TIME="${SHORT_MAX_TIME:-1}"           # minutes: the "short" partition's MaxTime
CLUSTER_NAME="${CLUSTER_NAME:-localcluster}"
MEM_HEADROOM_MB="${MEM_HEADROOM_MB:-2048}"     # RealMemory = detected - headroom ...
# ... but at least this much: the workflow's rules ask for realistic sizes (8 GB for the tiny
# test model's prune job), more than a small CI runner has. The test jobs use a few hundred MB
# and nothing enforces limits here (no cgroups), so the node may advertise more than it has
# (slurmd accepts that with SlurmdParameters=config_overrides).
MIN_NODE_MEM_MB="${MIN_NODE_MEM_MB:-32768}"
MIN_JOB_AGE="${MIN_JOB_AGE:-300}"              # s a finished job stays in squeue
WAIT_TIMEOUT="${WAIT_TIMEOUT:-60}"             # s to wait for the node to be idle
# SLURM client RPC timeout. NB: while the controller is DOWN every `scontrol`
# call blocks ~MessageTimeout-1 s, and the Snakemake SLURM plugin runs
# `scontrol show config` at import time, i.e. in EVERY snakemake call
# (--version, -n, --lint): ~10.6 s instead of ~1.5 s with the default 10.
MESSAGE_TIMEOUT="${MESSAGE_TIMEOUT:-10}"
FORCE="${FORCE:-0}"                            # 1 = overwrite a foreign slurm.conf

ETC=/etc/slurm
RUN=/run/local-slurm                 # our PID files + list of started daemons
STARTED="$RUN/started"               # "name pidfile" per daemon we started
FAKEDEV="$RUN/fake-gpu"              # dummy GPU device nodes
LOG=/var/log/slurm
MARKER="# Managed by start-local-slurm.sh"
DB_SOCK=/run/mysqld/mysqld.sock
DB_PASS=slurm-local-test             # local-only DB, unix socket only

log() { printf '[start-local-slurm] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"
T_START=$(date +%s.%N)

# ---------------------------------------------------------------- packages --
# Only installs what is missing. A temporary policy-rc.d stops Debian's
# maintainer scripts from auto-starting the services (we start them below).
need_pkgs=()
command -v munged    >/dev/null || need_pkgs+=(munge)
command -v slurmctld >/dev/null || need_pkgs+=(slurmctld)
command -v slurmd    >/dev/null || need_pkgs+=(slurmd)
command -v sbatch    >/dev/null || need_pkgs+=(slurm-client)
if [ "$SLURM_ACCOUNTING" = 1 ]; then
    command -v slurmdbd >/dev/null || need_pkgs+=(slurmdbd)
    command -v mariadbd >/dev/null || need_pkgs+=(mariadb-server)
fi
if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing: ${need_pkgs[*]}"
    own_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        own_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    # refresh lists if they are missing or older than a day
    if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mtime -1 2>/dev/null | head -1)" ]; then
        apt-get update -qq
    fi
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
    if [ "$own_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi

# ------------------------------------------------------------------ helpers --
# alive PIDFILE NAME -> 0 if the pid in PIDFILE is a live (non-zombie) NAME
alive() {
    local pf=$1 name=$2 pid st
    [ -s "$pf" ] || return 1
    pid=$( { tr -dc '0-9' < "$pf"; } 2>/dev/null )
    [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 1
    st=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
    [ "$st" != Z ] || return 1
    grep -q "$name" "/proc/$pid/comm" 2>/dev/null
}
record() { # remember that we started daemon $1 with pid file $2
    grep -q "^$1 " "$STARTED" 2>/dev/null || echo "$1 $2" >> "$STARTED"
}
ours() { grep -q "^$1 " "$STARTED" 2>/dev/null; }
reuse_msg() { # reuse_msg NAME
    if ours "$1"; then log "$1 already running"
    else log "$1 already running, not started by this script: reused, will not be stopped"; fi
}
wait_for() { # wait_for SECONDS DESCRIPTION CMD...
    local t=$1 what=$2; shift 2
    local end=$(( $(date +%s) + t ))
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$end" ] || die "timeout waiting for $what"
        sleep 0.2
    done
}
# write_if_changed FILE MODE  (content on stdin) -> returns 0 if it changed
write_if_changed() {
    local f=$1 mode=$2 tmp
    tmp=$(mktemp)
    cat > "$tmp"
    if [ -f "$f" ] && cmp -s "$tmp" "$f"; then rm -f "$tmp"; return 1; fi
    install -m "$mode" "$tmp" "$f"; rm -f "$tmp"; return 0
}

mkdir -p "$RUN" "$ETC" "$LOG" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd
touch "$STARTED"

# ------------------------------------------------------------------ node info --
NODE=$(hostname -s)
# slurmd -C prints the detected topology, e.g.
# NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105
HW=$(slurmd -C | head -1)
field() { sed -n "s/.*[[:space:]]$1=\([0-9]*\).*/\1/p" <<< "$HW"; }
CPUS=$(field CPUs); BOARDS=$(field Boards); SOCKETS=$(field SocketsPerBoard)
CORES=$(field CoresPerSocket); THREADS=$(field ThreadsPerCore)
MEM=$(( $(field RealMemory) - MEM_HEADROOM_MB ))
MEM_OVERRIDE=""
if [ "$MEM" -lt "$MIN_NODE_MEM_MB" ]; then
    MEM=$MIN_NODE_MEM_MB
    MEM_OVERRIDE="SlurmdParameters=config_overrides"
fi

# ------------------------------------------------------------------- configs --
if [ -f "$ETC/slurm.conf" ] && ! grep -q "^$MARKER" "$ETC/slurm.conf"; then
    [ "$FORCE" = 1 ] || die "$ETC/slurm.conf exists and is not ours (FORCE=1 overwrites it, keeping a .bak)"
    cp "$ETC/slurm.conf" "$ETC/slurm.conf.bak"
fi

GRES_NODE=""; GRES_TYPES=""
if [ "$FAKE_GPUS" -gt 0 ]; then
    GRES_TYPES="GresTypes=gpu"
    GRES_NODE="Gres=gpu:${GPU_TYPE}:${FAKE_GPUS}"
fi
if [ "$SLURM_ACCOUNTING" = 1 ]; then
    ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu,gres/gpu:$GPU_TYPE
# keep sbatch --comment (the Snakemake executor writes rule name + wildcards there)
AccountingStoreFlags=job_comment"
else
    ACCT="AccountingStorageType=accounting_storage/none"
fi

conf_changed=0
if write_if_changed "$ETC/slurm.conf" 644 <<EOF; then conf_changed=1; fi
$MARKER - regenerated on every start, edit the script instead.
# Single-node test cluster: everything on 127.0.0.1, no cgroups needed.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
MessageTimeout=$MESSAGE_TIMEOUT
# no cgroup plugins: works in containers/VMs without a delegated cgroup tree
ProctrackType=proctrack/linuxproc
# task/affinity: the executor's inner 'srun --cpu-bind=q' needs a binding plugin
TaskPlugin=task/affinity
ReturnToService=2
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without this a job that gives no --mem gets ALL node memory and blocks others
DefMemPerCPU=1000
# keep finished jobs visible to squeue for MinJobAge seconds (squeue status mode)
MinJobAge=$MIN_JOB_AGE
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=2
# memory limits without cgroups: a step whose polled RSS exceeds its --mem is killed
JobAcctGatherParams=OverMemoryKill
# at the time limit: SIGTERM, then SIGKILL after KillWait seconds (the prune job checkpoints)
KillWait=30
$ACCT
$GRES_TYPES
$MEM_OVERRIDE
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS Boards=$BOARDS SocketsPerBoard=$SOCKETS CoresPerSocket=$CORES ThreadsPerCore=$THREADS RealMemory=$MEM $GRES_NODE State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=ALL MaxTime=INFINITE State=UP
PartitionName=short Nodes=ALL MaxTime=$SHORT_MAX_TIME State=UP
EOF

# Fake GPUs: gres.conf needs File= entries (without File, slurmd reports 0 GPUs
# and the node is set INVAL "gres/gpu count reported lower than configured").
# Dummy char devices with /dev/null's numbers (1,3) are harmless.
if [ "$FAKE_GPUS" -gt 0 ]; then
    mkdir -p "$FAKEDEV"
    for ((i = 0; i < FAKE_GPUS; i++)); do
        [ -c "$FAKEDEV/gpu$i" ] || mknod "$FAKEDEV/gpu$i" c 1 3
    done
    if write_if_changed "$ETC/gres.conf" 644 <<EOF; then conf_changed=1; fi
$MARKER
NodeName=$NODE Name=gpu Type=$GPU_TYPE File=$FAKEDEV/gpu[0-$((FAKE_GPUS - 1))]
EOF
else
    rm -f "$ETC/gres.conf"
fi

if [ "$SLURM_ACCOUNTING" = 1 ]; then
    if write_if_changed "$ETC/slurmdbd.conf" 600 <<EOF; then conf_changed=1; fi
$MARKER
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
# MariaDB via unix socket (/run/mysqld/mysqld.sock), networking disabled
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=$DB_PASS
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
EOF
fi

# If the configuration changed while our SLURM daemons run, restart them.
if [ "$conf_changed" = 1 ] && { alive "$RUN/slurmctld.pid" slurmctld || alive "$RUN/slurmd.pid" slurmd; }; then
    log "configuration changed: restarting slurmd/slurmctld/slurmdbd"
    for d in slurmd slurmctld slurmdbd; do
        if alive "$RUN/$d.pid" "$d"; then
            kill "$(cat "$RUN/$d.pid")"
            for _ in $(seq 1 50); do alive "$RUN/$d.pid" "$d" || break; sleep 0.2; done
        fi
    done
fi

# -------------------------------------------------------------------- munged --
munge_ok() { { munge -n </dev/null | unmunge; } >/dev/null 2>&1; }
if munge_ok; then
    reuse_msg munged
else
    [ -s /etc/munge/munge.key ] || { mungekey --create --keyfile=/etc/munge/munge.key; }
    chown munge:munge /etc/munge/munge.key; chmod 600 /etc/munge/munge.key
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 /var/log/munge /var/lib/munge
    # munged refuses root; it forks into the background itself
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    record munged /run/munge/munged.pid
    wait_for 20 munged munge_ok
    log "munged started"
fi

# --------------------------------------------------- MariaDB + slurmdbd ------
if [ "$SLURM_ACCOUNTING" = 1 ]; then
    db_ok() { mariadb-admin --socket="$DB_SOCK" ping; }
    if db_ok >/dev/null 2>&1; then
        reuse_msg mariadbd
    else
        install -d -o mysql -g mysql -m 755 /run/mysqld
        if [ ! -d /var/lib/mysql/mysql ]; then
            mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
        fi
        # no TCP listener at all: --skip-networking
        setsid /usr/sbin/mariadbd --user=mysql --skip-networking \
            --socket="$DB_SOCK" --pid-file=/run/mysqld/mysqld.pid \
            >> "$LOG/mariadb.log" 2>&1 < /dev/null &
        record mariadbd /run/mysqld/mysqld.pid
        wait_for 60 MariaDB db_ok
        log "MariaDB started"
    fi
    mariadb --socket="$DB_SOCK" <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
    if alive "$RUN/slurmdbd.pid" slurmdbd; then
        log "slurmdbd already running"
    else
        slurmdbd                       # daemonizes, writes $RUN/slurmdbd.pid
        record slurmdbd "$RUN/slurmdbd.pid"
        wait_for 60 slurmdbd sacctmgr -n list cluster
        log "slurmdbd started"
    fi
    # cluster, accounts and user associations (idempotent)
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER_NAME"; then
        sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null
    fi
    for a in ${SLURM_ACCOUNTS//,/ }; do
        sacctmgr -n -P list account format=account | grep -qx "$a" \
            || sacctmgr -i add account "$a" Description=test Organization=test >/dev/null
        sacctmgr -n -P list assoc user="$SLURM_USER_FOR_ACCOUNTS" account="$a" format=account | grep -qx "$a" \
            || sacctmgr -i add user "$SLURM_USER_FOR_ACCOUNTS" account="$a" >/dev/null
    done
fi

# ------------------------------------------------------- slurmctld + slurmd --
if alive "$RUN/slurmctld.pid" slurmctld; then
    log "slurmctld already running"
else
    slurmctld                          # daemonizes, writes $RUN/slurmctld.pid
    record slurmctld "$RUN/slurmctld.pid"
    wait_for 30 slurmctld scontrol ping
    log "slurmctld started"
fi
if alive "$RUN/slurmd.pid" slurmd; then
    log "slurmd already running"
else
    slurmd                             # daemonizes, writes $RUN/slurmd.pid
    record slurmd "$RUN/slurmd.pid"
    log "slurmd started"
fi

# ------------------------------------------------------------ wait for idle --
# A node drained in an earlier run (state is kept in StateSaveLocation) is
# resumed once; a real config problem shows up as the reason on timeout.
node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null; }
resumed=0
end=$(( $(date +%s) + WAIT_TIMEOUT ))
while :; do
    st=$(node_state)
    case "$st" in
        idle|mixed|allocated|completing) break ;;
        *drain*|*down*|*inval*)
            if [ "$resumed" = 0 ]; then
                scontrol update nodename="$NODE" state=resume 2>/dev/null || true
                resumed=1
            fi ;;
    esac
    if [ "$(date +%s)" -ge "$end" ]; then
        sinfo -N -o '%N %T %E' >&2
        die "node $NODE not idle after ${WAIT_TIMEOUT}s (state '$st'); see $LOG/slurmd.log, $LOG/slurmctld.log"
    fi
    sleep 0.25
done

# smoke test: one real job step through slurmctld -> slurmd -> slurmstepd
srun -t 1 -N1 -n1 --mem=100 true || die "smoke test 'srun true' failed"
if [ "$FAKE_GPUS" -gt 0 ]; then
    srun -t 1 --mem=100 --gres="gpu:${GPU_TYPE}:1" true || die "smoke test with --gres=gpu:${GPU_TYPE}:1 failed"
fi
if [ "$SLURM_ACCOUNTING" = 1 ]; then
    sacct -n -X >/dev/null 2>&1 || die "sacct does not work (slurmdbd?)"
fi

T_END=$(date +%s.%N)
GRES_DESC=${GRES_NODE#Gres=}; GRES_DESC=${GRES_DESC:-none}
log "cluster '$CLUSTER_NAME' ready in $(awk "BEGIN{printf \"%.1f\", $T_END-$T_START}") s"
sinfo -N -o '%N %P %T %c %m %G'
cat >&2 <<EOF

  node:       $NODE  CPUs=$CPUS  RealMemory=${MEM}MB  gres: $GRES_DESC
  partition:  $PARTITION (default)   accounting: $([ "$SLURM_ACCOUNTING" = 1 ] && echo "slurmdbd (sacct works; accounts: $SLURM_ACCOUNTS)" || echo "none (use slurm-status-command: squeue)")
  logs:       $LOG/{slurmctld,slurmd$([ "$SLURM_ACCOUNTING" = 1 ] && echo ",slurmdbd,mariadb")}.log
  stop with:  $(dirname "$(readlink -f "$0")")/stop-local-slurm.sh
EOF

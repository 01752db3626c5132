#!/usr/bin/env bash
# A real Slurm on this one machine, for testing the sbatch scripts (tests/test_slurm.py calls it).
#   scripts/slurm/local_cluster.sh start [--gpus N]   # two nodes; --gpus: N fake GPUs per node
#   scripts/slurm/local_cluster.sh status
#   scripts/slurm/local_cluster.sh stop
# Needs root and Debian's packages (`apt-get install -y slurm-wlm munge`, Slurm 22.05). Writes
# /etc/slurm/slurm.conf (refusing to replace one it did not write) and starts munged, slurmctld
# and one slurmd per node, without systemd or cgroups. The two nodes are this machine's hostname
# and `localhost` (this build runs one slurmd per node name, each on its own port). Without
# --gpus the cluster has no GPU resource, like a CPU-only cluster: submit with --gpus-per-node=0.
# With --gpus N, device files /dev/fakegpu* stand in for GPUs (the training still runs on the CPU).
set -euo pipefail

CONF=/etc/slurm/slurm.conf
GRES=/etc/slurm/gres.conf
MARK="# written by graft scripts/slurm/local_cluster.sh"
STATE=/var/spool/slurmctld
HOST="$(hostname)"

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

ready() {  # both nodes idle (or busy): the cluster takes jobs
    local states
    states="$(timeout 10 sinfo -h -N -o '%N %t' 2>/dev/null)" || return 1
    [ "$(grep -cE ' (idle|mix|alloc)$' <<<"$states")" -eq 2 ]
}

write_conf() {
    local gpus="$1" cpus mem gres="" types=""
    # The machine's cores, not `nproc`: that honours OMP_NUM_THREADS (1 in the test environment)
    # and would make 1-CPU nodes that refuse every 2-CPU job.
    cpus="$(getconf _NPROCESSORS_ONLN 2>/dev/null || nproc --all)"
    mem="$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))"
    if [ "$gpus" -gt 0 ]; then gres=" Gres=gpu:$gpus" types="GresTypes=gpu"; fi
    mkdir -p /etc/slurm
    cat > "$CONF" <<EOF
$MARK
ClusterName=graftest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
KillWait=30
InactiveLimit=0
MinJobAge=300
$types
NodeName=$HOST NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17001 CPUs=$cpus RealMemory=$mem$gres State=UNKNOWN
NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 Port=17002 CPUs=$cpus RealMemory=$mem$gres State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    rm -f "$GRES"
    if [ "$gpus" -gt 0 ]; then
        # A gres.conf with only Count= leaves the nodes INVALID; device files make it work.
        for ((i = 0; i < gpus; i++)); do [ -e "/dev/fakegpu$i" ] || mknod "/dev/fakegpu$i" c 1 3; done
        echo "$MARK" > "$GRES"
        echo "NodeName=$HOST,localhost Name=gpu File=/dev/fakegpu[0-$((gpus - 1))]" >> "$GRES"
    fi
}

start() {
    local gpus=0
    while [ $# -gt 0 ]; do
        case "$1" in
            --gpus) gpus="${2:?--gpus needs a number}"; shift 2 ;;
            *) die "unknown option $1 (usage: start [--gpus N])" ;;
        esac
    done
    [ "$(id -u)" -eq 0 ] || die "needs root (it starts munged, slurmctld and slurmd)"
    for exe in /usr/sbin/munged /usr/sbin/slurmctld /usr/sbin/slurmd; do
        [ -x "$exe" ] || die "$exe missing: apt-get install -y slurm-wlm munge"
    done
    if [ -f "$CONF" ] && ! grep -qxF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; not replacing it"
    fi
    if [ -f /run/slurmctld.pid ] && kill -0 "$(cat /run/slurmctld.pid)" 2>/dev/null; then
        die "slurmctld is already running (pid $(cat /run/slurmctld.pid)): '$0 stop' first"
    fi
    mkdir -p "$STATE" /var/spool/slurmd /var/log/slurm /run/munge
    chown munge:munge /run/munge
    if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        su -s /bin/sh munge -c /usr/sbin/munged
        touch /run/munge/.started-by-local-cluster
    fi
    write_conf "$gpus"
    /usr/sbin/slurmctld -c           # -c: a clean start, no jobs from an earlier session
    /usr/sbin/slurmd -N "$HOST"      # the node named localhost must not be listed (or started) first
    /usr/sbin/slurmd -N localhost
    for _ in $(seq 60); do
        if ready; then sinfo; return 0; fi
        sleep 1
    done
    sinfo -N -l >&2 || true
    die "the nodes did not become idle within 60 s; see /var/log/slurm/"
}

stop() {
    local pidfile pid
    for pidfile in /run/slurmd-*.pid /run/slurmctld.pid; do
        [ -f "$pidfile" ] || continue
        pid="$(cat "$pidfile")"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        rm -f "$pidfile"
    done
    if [ -f /run/munge/.started-by-local-cluster ] && [ -f /run/munge/munged.pid ]; then
        kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
        rm -f /run/munge/.started-by-local-cluster
    fi
    echo "local cluster stopped"
}

case "${1:-}" in
    start) shift; start "$@" ;;
    stop) stop ;;
    status) if ready; then sinfo; else echo "no local cluster taking jobs"; exit 1; fi ;;
    *) die "usage: $0 start [--gpus N] | status | stop" ;;
esac

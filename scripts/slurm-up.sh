#!/usr/bin/env bash
# Start a single-node Slurm cluster on this machine, for sdpipe's Slurm executor tests
# (`SDPIPE_SLURM_TESTS=1 cargo test --test integration slurm::`) and for trying `executor: slurm` by hand.
#
# Installs Debian's slurm-wlm (slurmctld, slurmd, the client commands) and munge with apt-get
# when they are missing, writes a minimal slurm.conf describing this host with its real CPU
# count and memory (as `slurmd -C` detects them), starts munged, slurmctld and slurmd, and waits
# until `sinfo` shows the node idle. Idempotent: running it again on a running cluster only
# checks it. Needs root (it installs packages and writes /etc/slurm). No accounting database is
# set up: sdpipe falls back from `sacct` to `scontrol show job` for finished jobs.
#
# Environment: SLURM_UP_TIMEOUT (seconds to wait for the node, default 120).
set -euo pipefail

timeout_s=${SLURM_UP_TIMEOUT:-120}
conf_dir=/etc/slurm
conf=$conf_dir/slurm.conf

say() { echo "slurm-up: $*" >&2; }
die() {
    say "error: $*"
    exit 1
}

[ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts daemons)"

# 1. Packages.
missing=0
for bin in slurmctld slurmd sbatch squeue sacct scancel scontrol sinfo munged munge; do
    command -v "$bin" >/dev/null 2>&1 || missing=1
done
if [ "$missing" = 1 ]; then
    say "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# 2. munge: the key, then the daemon (Slurm's daemons and clients authenticate through it).
if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "starting munged"
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
    munge -n | unmunge >/dev/null || die "munged does not answer"
fi

# 3. slurm.conf for this host. `slurmd -C` prints the node line with the detected CPUs,
# sockets, cores and memory; the node and the controller are this host, reached on loopback so
# that no name resolution is needed.
host=$(hostname -s)
node_line=$(slurmd -C | grep '^NodeName=' | sed -e 's/ UpTime=.*//')
[ -n "$node_line" ] || die "slurmd -C did not describe this host"
mkdir -p "$conf_dir" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm
wanted=$(
    cat <<EOF
# Written by sdpipe's scripts/slurm-up.sh: a single-node test cluster.
ClusterName=sdpipe
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# No cgroups in a container: track job processes by parentage.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# No accounting database: finished jobs are read with \`scontrol show job\` for MinJobAge seconds.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
)
changed=0
if [ ! -f "$conf" ] || [ "$(cat "$conf")" != "$wanted" ]; then
    say "writing $conf"
    printf '%s\n' "$wanted" >"$conf"
    changed=1
fi

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# 4. Daemons. A changed configuration restarts them.
if [ "$changed" = 1 ]; then
    for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
        if running "$pidfile"; then
            kill "$(cat "$pidfile")"
            for _ in $(seq 50); do running "$pidfile" || break; sleep 0.1; done
        fi
    done
fi
if ! running /run/slurmctld.pid; then
    say "starting slurmctld"
    slurmctld
fi
if ! running /run/slurmd.pid; then
    say "starting slurmd"
    slurmd
fi

# 5. Wait for the node to be idle; a node that was down (the daemons were restarted) is resumed.
deadline=$((SECONDS + timeout_s))
while :; do
    state=$(sinfo -h -n "$host" -o '%t' 2>/dev/null | head -1 || true)
    case "$state" in
    idle | mix | alloc) break ;;
    down* | drain* | drng*) scontrol update nodename="$host" state=resume 2>/dev/null || true ;;
    esac
    if [ "$SECONDS" -ge "$deadline" ]; then
        say "the node is '${state:-unknown}' after ${timeout_s}s; last lines of the logs:"
        tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
        exit 1
    fi
    sleep 0.5
done
say "ready: $(sinfo -h -o '%P %D %t %c cpus %m MB' | head -1)"

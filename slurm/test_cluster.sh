#!/usr/bin/env bash
# A one-node Slurm cluster on this machine (no GPUs, one partition), to try the sbatch
# templates on CPU. As root, with Slurm's Debian packages (bash slurm/install_test_cluster.sh):
#
#   eval "$(bash slurm/test_cluster.sh start /tmp/unilip_slurm)"   # sets SLURM_CONF for this shell
#   bash slurm/test_cluster.sh stop /tmp/unilip_slurm
#
# start writes DIR/slurm.conf (free ports; state, spool and logs under DIR), starts slurmctld
# and slurmd in the background (their pids in DIR/*.pid, logs in DIR/log/), waits until the
# node is idle and prints `export SLURM_CONF=DIR/slurm.conf` on stdout (everything else goes
# to stderr). stop ends those two daemons, by their pid files.
set -euo pipefail

die() { echo "test_cluster.sh: error: $*" >&2; exit 2; }
[[ $# -eq 2 && ( "$1" == start || "$1" == stop ) ]] || die "usage: test_cluster.sh start|stop DIR"
ACTION="$1"
DIR="$(mkdir -p "$2" && cd "$2" && pwd)"
CONF="$DIR/slurm.conf"

stop_daemon() {  # the daemon whose pid file is $1, TERM then KILL
    local pidfile="$1" pid
    [[ -f "$pidfile" ]] || return 0
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$pidfile"
}

if [[ "$ACTION" == stop ]]; then
    stop_daemon "$DIR/slurmd.pid"  # the node first, then the controller
    stop_daemon "$DIR/slurmctld.pid"
    echo "test_cluster.sh: stopped the cluster of $CONF" >&2
    exit 0
fi

[[ $(id -u) -eq 0 ]] || die "slurmd must run as root to start jobs"
for b in slurmctld slurmd sbatch sinfo; do
    command -v "$b" >/dev/null || die "$b not found; as root: bash slurm/install_test_cluster.sh"
done
[[ -f "$DIR/slurmctld.pid" ]] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null &&
    die "a cluster is already running from $DIR (bash slurm/test_cluster.sh stop $DIR)"

# slurmstepd binds a Unix socket DIR/spool/<node>_<job>.<step> (108 bytes at most): with a
# longer DIR every job fails to start and is requeued, silently
sock="$DIR/spool/localhost_4294967294.4294967291"
(( ${#sock} < 108 )) || die "DIR $DIR is too long for slurmstepd's sockets (${#sock} > 107 characters under spool/); use a shorter one"
# the CPUs this process may use (nproc alone would follow OMP_NUM_THREADS)
cpus="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
ctld_port="$(free_port)"
slurmd_port="$(free_port)"
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
cat >"$CONF" <<EOF
ClusterName=unilip-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
MinJobAge=600
SchedulerParameters=sched_interval=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.daemon.pid
SlurmdPidFile=$DIR/slurmd.daemon.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$CONF"

# in the foreground (-D) of a background job of their own session: their pids are ours
setsid slurmctld -D -i -f "$CONF" </dev/null >>"$DIR/log/slurmctld.out" 2>&1 &
echo $! >"$DIR/slurmctld.pid"
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$ctld_port") 2>/dev/null && break
    kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null || die "slurmctld exited: $(tail -n 5 "$DIR/log/slurmctld.log" 2>/dev/null)"
    sleep 0.2
done
setsid slurmd -D -N localhost -f "$CONF" </dev/null >>"$DIR/log/slurmd.out" 2>&1 &
echo $! >"$DIR/slurmd.pid"
for _ in $(seq 100); do
    [[ "$(timeout 20 sinfo -h -o %t 2>/dev/null)" == idle ]] && break
    kill -0 "$(cat "$DIR/slurmd.pid")" 2>/dev/null || die "slurmd exited: $(tail -n 5 "$DIR/log/slurmd.log" 2>/dev/null)"
    sleep 0.2
done
[[ "$(timeout 20 sinfo -h -o %t 2>/dev/null)" == idle ]] || die "the node did not become idle; see $DIR/log/"
echo "test_cluster.sh: one node (localhost, $cpus CPUs, no GPUs), partition debug; logs in $DIR/log" >&2
echo "export SLURM_CONF=$CONF"

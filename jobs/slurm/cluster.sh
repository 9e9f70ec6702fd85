#!/bin/bash
# A one-node SLURM cluster (munged, slurmctld, slurmd) from Debian's packages, without systemd.
#
#   jobs/slurm/cluster.sh install        apt-get the packages (root; ~10 s)
#   jobs/slurm/cluster.sh up [DIR]       start the daemons; prints `export SLURM_CONF=DIR/slurm.conf`
#   jobs/slurm/cluster.sh up DIR --netns N   N nodes, each in a namespace host (tests/netbed.py)
#   jobs/slurm/cluster.sh exec DIR CMD...    run a client (sbatch, squeue...) on the cluster
#   jobs/slurm/cluster.sh down [DIR]     cancel its jobs, stop its daemons by pid
#   jobs/slurm/cluster.sh status [DIR]   sinfo and squeue of that cluster
#
# DIR (default /tmp/dbmpi-slurm) holds everything: slurm.conf, the munge key and socket, the
# spool and state directories, pid files and logs (DIR/log). Ports are free ones picked at
# start-up (or DBMPI_SLURMCTLD_PORT / DBMPI_SLURMD_PORT), so several clusters can run at once.
# The node advertises DBMPI_SLURM_CPUS CPUs (default 8) whatever it has. Needs root.
# With --netns N the nodes node0..nodeN-1 are hosts of a bed of network namespaces (addresses
# 10.213.0.1..N, own hostnames): slurmctld and one `slurmd -N nodeK` run in each host, so a
# job's ranks on different nodes talk TCP. The bed's id is in DIR/netbed; clients must run in
# host 0 (the login node): use `cluster.sh exec DIR sbatch ...`. munged stays outside (its
# socket is a file) and owns the bed: once it is gone the bed is stale.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
STATE=${2:-/tmp/dbmpi-slurm}
CONF=$STATE/slurm.conf
SBIN=/usr/sbin
REPO=$(cd "$HERE/../.." && pwd -P)
NETNS_HOSTS=0
if [ "${1:-}" = up ] && [ "${3:-}" = --netns ]; then
    NETNS_HOSTS=${4:-}
    [[ $NETNS_HOSTS =~ ^[1-9][0-9]?$ ]] || { echo "cluster.sh: --netns needs a number of hosts" >&2; exit 2; }
fi
PACKAGES=(slurmctld slurmd slurm-client munge)

die() { echo "cluster.sh: $*" >&2; exit 1; }

install_packages() {
    [ "$(id -u)" = 0 ] || die "installing the packages needs root"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" \
        || { apt-get update -q && apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"; }
}

free_ports() {  # two distinct free TCP ports
    python3 -c 'import socket
ss = [socket.socket() for _ in range(2)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in ss))'
}

running() {  # running PID: the process exists and is not a zombie (init reaps those late)
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    [ "$(echo "${stat##*) }" | cut -d' ' -f1)" != Z ]
}

alive() {  # alive PIDFILE NAME: the pid in PIDFILE runs a program called NAME
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1")
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] && running "$pid"
}

bed() { cat "$STATE/netbed" 2>/dev/null; }

in_host() {  # in_host K CMD...: run CMD in namespace host K of the bed with hostname nodeK
    local k=$1
    shift
    # `ip netns exec` mounts a fresh /sys (the host's network devices, which UCX lists) without
    # the cgroup mounts, and slurmd will not start without them (though it uses no cgroup
    # here: proctrack/linuxproc, task/none): mount cgroup2, or for v1 the named systemd
    # hierarchy that slurmd checks for, in that namespace's private mount table.
    local cg='mount -t cgroup2 none /sys/fs/cgroup'
    [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ] || cg='mount -t tmpfs cgroup /sys/fs/cgroup &&
        mkdir /sys/fs/cgroup/systemd && mount -t cgroup -o none,name=systemd none /sys/fs/cgroup/systemd'
    ip netns exec "$(bed)-h$k" unshare --uts /bin/sh -c "$cg"' && hostname "$0" && exec "$@"' \
        "node$k" "$@"
}

client() {  # a SLURM client command where the controller can be reached
    if [ -n "$(bed)" ]; then in_host 0 "$@"; else "$@"; fi
}

stop_pid() {  # stop_pid PID: TERM, wait up to 10 s, then KILL
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 200); do
        running "$pid" || return 0
        sleep 0.05
    done
    echo "cluster.sh: pid $pid ignored SIGTERM, killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
}

up() {
    [ "$(id -u)" = 0 ] || die "slurmd needs root (run as root, or use jobs/local.sh)"
    for prog in munged slurmctld slurmd; do
        [ -x "$SBIN/$prog" ] || die "$SBIN/$prog missing: run \`$0 install\` (as root)"
    done
    ! alive "$STATE/slurmctld.pid" slurmctld || die "a cluster already runs in $STATE"
    rm -rf "$STATE"
    mkdir -p "$STATE"/{munge,ctld,slurmd,log}
    chmod 700 "$STATE" "$STATE/munge"

    read -r ctld_port slurmd_port <<< "$(free_ports)"
    sed -e "s|@STATE@|$STATE|g" -e "s|@NODE@|$(hostname -s)|g" \
        -e "s|@CTLD_PORT@|${DBMPI_SLURMCTLD_PORT:-$ctld_port}|g" \
        -e "s|@SLURMD_PORT@|${DBMPI_SLURMD_PORT:-$slurmd_port}|g" \
        -e "s|@CPUS@|${DBMPI_SLURM_CPUS:-8}|g" -e "s|@HERE@|$HERE|g" \
        -e "s|@FIRST_JOB_ID@|$(( (RANDOM << 15 | RANDOM) % 60000000 + 1000 ))|g" \
        "$HERE/slurm.conf.in" > "$CONF"

    # munged refuses to run as root unless forced; its files are private to this cluster.
    head -c 1024 /dev/urandom > "$STATE/munge/munge.key"
    chmod 400 "$STATE/munge/munge.key"
    "$SBIN/munged" --force --socket="$STATE/munge/munge.socket" \
        --key-file="$STATE/munge/munge.key" --pid-file="$STATE/munge/munged.pid" \
        --seed-file="$STATE/munge/munged.seed" --log-file="$STATE/log/munged.log" \
        || die "munged did not start (see $STATE/log/munged.log)"

    export SLURM_CONF=$CONF  # slurmd passes it on to slurmstepd: `down` finds those by it
    if [ "$NETNS_HOSTS" -gt 0 ]; then
        up_netns
    else
        "$SBIN/slurmctld" -f "$CONF" || die "slurmctld did not start (see $STATE/log/slurmctld.log)"
        "$SBIN/slurmd" -f "$CONF" || die "slurmd did not start (see $STATE/log/slurmd.log)"
    fi
    for _ in $(seq 100); do
        if [ "$(client sinfo -h -N -o %T 2>/dev/null | grep -cx idle)" = "$(( NETNS_HOSTS > 0 ? NETNS_HOSTS : 1 ))" ]; then
            echo "export SLURM_CONF=$CONF"
            return 0
        fi
        sleep 0.2
    done
    client sinfo >&2 || true
    tail -n 5 "$STATE"/log/*.log >&2 || true
    down
    die "the node did not become idle within 20 s"
}

up_netns() {  # the nodes as namespace hosts: one slurmd each, slurmctld in host 0
    local k out
    out=$(cd "$REPO" && python3 -m tests.netbed up --hosts "$NETNS_HOSTS" --name slurm \
          --owner "$(cat "$STATE/munge/munged.pid")") || { down; die "no bed of namespaces: $out"; }
    echo "${out#export DBMPI_NETBED=}" > "$STATE/netbed"
    # One slurmd per node on one machine: its pid file, spool and log are per node (%n).
    sed -i -e "s|^SlurmctldHost=.*|SlurmctldHost=node0(10.213.0.1)|" \
        -e "s|^SlurmdPidFile=.*|SlurmdPidFile=$STATE/slurmd-%n.pid|" \
        -e "s|^SlurmdSpoolDir=.*|SlurmdSpoolDir=$STATE/slurmd/%n|" \
        -e "s|^SlurmdLogFile=.*|SlurmdLogFile=$STATE/log/slurmd-%n.log|" \
        -e "/^NodeName=/d" "$CONF"
    for k in $(seq 0 $((NETNS_HOSTS - 1))); do
        echo "NodeName=node$k NodeAddr=10.213.0.$((k + 1)) CPUs=${DBMPI_SLURM_CPUS:-8} State=UNKNOWN"
    done >> "$CONF"
    in_host 0 "$SBIN/slurmctld" -f "$CONF" || { down; die "slurmctld did not start (see $STATE/log)"; }
    for k in $(seq 0 $((NETNS_HOSTS - 1))); do
        mkdir -p "$STATE/slurmd/node$k"
        in_host "$k" "$SBIN/slurmd" -f "$CONF" -N "node$k" \
            || { down; die "slurmd of node$k did not start (see $STATE/log/slurmd-node$k.log)"; }
    done
}

down() {
    [ -d "$STATE" ] || return 0
    export SLURM_CONF=$CONF
    if alive "$STATE/slurmctld.pid" slurmctld && [ -n "$(client squeue -h -o %i 2>/dev/null)" ]; then
        client scancel --user="$(id -un)" 2>/dev/null || true
        for _ in $(seq 50); do
            [ -z "$(client squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
    for pidfile in "$STATE"/slurmd*.pid; do
        if alive "$pidfile" slurmd; then stop_pid "$(cat "$pidfile")"; fi
    done
    # Job steps outlive slurmd by design; stop the ones this cluster started.
    for pid in $(pgrep -x slurmstepd || true); do
        if { tr '\0' '\n' < "/proc/$pid/environ"; } 2>/dev/null | grep -qx "SLURM_CONF=$CONF"; then
            stop_pid "$pid"
        fi
    done
    if alive "$STATE/slurmctld.pid" slurmctld; then stop_pid "$(cat "$STATE/slurmctld.pid")"; fi
    if alive "$STATE/munge/munged.pid" munged; then stop_pid "$(cat "$STATE/munge/munged.pid")"; fi
    if [ -n "$(bed)" ]; then  # whatever still runs in the hosts, then the namespaces
        (cd "$REPO" && python3 -m tests.netbed down "$(bed)") || true
        rm -f "$STATE/netbed"
    fi
}

case ${1:-} in
    install) install_packages ;;
    up) up ;;
    down) down ;;
    exec) shift 2; SLURM_CONF=$CONF client "$@" ;;
    status) SLURM_CONF=$CONF client sinfo && SLURM_CONF=$CONF client squeue ;;
    *) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac

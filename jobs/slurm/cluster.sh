#!/bin/bash
# A one-node SLURM cluster (munged, slurmctld, slurmd) from Debian's packages, without systemd.
#
#   jobs/slurm/cluster.sh install        apt-get the packages (root; ~10 s)
#   jobs/slurm/cluster.sh up [DIR]       start the daemons; prints `export SLURM_CONF=DIR/slurm.conf`
#   jobs/slurm/cluster.sh down [DIR]     cancel its jobs, stop its daemons by pid
#   jobs/slurm/cluster.sh status [DIR]   sinfo and squeue of that cluster
#
# DIR (default /tmp/dbmpi-slurm) holds everything: slurm.conf, the munge key and socket, the
# spool and state directories, pid files and logs (DIR/log). Ports are free ones picked at
# start-up (or DBMPI_SLURMCTLD_PORT / DBMPI_SLURMD_PORT), so several clusters can run at once.
# The node advertises DBMPI_SLURM_CPUS CPUs (default 8) whatever it has. Needs root.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
STATE=${2:-/tmp/dbmpi-slurm}
CONF=$STATE/slurm.conf
SBIN=/usr/sbin
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
    "$SBIN/slurmctld" -f "$CONF" || die "slurmctld did not start (see $STATE/log/slurmctld.log)"
    "$SBIN/slurmd" -f "$CONF" || die "slurmd did not start (see $STATE/log/slurmd.log)"
    for _ in $(seq 100); do
        if [ "$(sinfo -h -o %T 2>/dev/null)" = idle ]; then
            echo "export SLURM_CONF=$CONF"
            return 0
        fi
        sleep 0.2
    done
    sinfo >&2 || true
    tail -n 5 "$STATE"/log/*.log >&2 || true
    down
    die "the node did not become idle within 20 s"
}

down() {
    [ -d "$STATE" ] || return 0
    export SLURM_CONF=$CONF
    if alive "$STATE/slurmctld.pid" slurmctld && [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
        scancel --user="$(id -un)" 2>/dev/null || true
        for _ in $(seq 50); do
            [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
    if alive "$STATE/slurmd.pid" slurmd; then stop_pid "$(cat "$STATE/slurmd.pid")"; fi
    # Job steps outlive slurmd by design; stop the ones this cluster started.
    for pid in $(pgrep -x slurmstepd || true); do
        if tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qx "SLURM_CONF=$CONF"; then
            stop_pid "$pid"
        fi
    done
    if alive "$STATE/slurmctld.pid" slurmctld; then stop_pid "$(cat "$STATE/slurmctld.pid")"; fi
    if alive "$STATE/munge/munged.pid" munged; then stop_pid "$(cat "$STATE/munge/munged.pid")"; fi
}

case ${1:-} in
    install) install_packages ;;
    up) up ;;
    down) down ;;
    status) SLURM_CONF=$CONF sinfo && SLURM_CONF=$CONF squeue ;;
    *) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac

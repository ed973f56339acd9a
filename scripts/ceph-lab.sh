#!/usr/bin/env bash
# A single-node Ceph (Pacific) cluster on loopback for the RBD tests (issue 9), following the
# recipe in ../shared/LAB.md: one monitor, one memstore OSD, no authentication, pool `rbd`.
#
#   scripts/ceph-lab.sh start     install what is missing, create or revive the cluster, wait
#                                 until an RBD image can be created, print the ceph.conf path
#                                 (the one to name as rbd:pool/image:conf=PATH) on stdout
#   scripts/ceph-lab.sh stop      stop every daemon by its pid and remove the state directory
#   scripts/ceph-lab.sh restart   stop the daemons cleanly and start them again (the cluster and
#                                 its images survive: memstore saves its objects on a clean
#                                 shutdown), for reconnection tests
#   scripts/ceph-lab.sh status    print `ceph -s`
#   scripts/ceph-lab.sh conf      print the ceph.conf path if the cluster exists
#
# Environment: IMG_CEPH_DIR (state directory, default /tmp/img-ceph-lab),
# IMG_CEPH_TIMEOUT (seconds to wait for each step, default 120),
# IMG_CEPH_PORT (monitor msgr2 port, default 3300; msgr1 uses IMG_CEPH_PORT_V1, default 6789).
# Every wait is bounded; every failure names the step and the log to read.
set -euo pipefail

LAB_NAME=ceph-lab
DIR=${IMG_CEPH_DIR:-/tmp/img-ceph-lab}
TIMEOUT=${IMG_CEPH_TIMEOUT:-120}
PORT_V2=${IMG_CEPH_PORT:-3300}
PORT_V1=${IMG_CEPH_PORT_V1:-6789}
CONF="$DIR/ceph.conf"
PACKAGES=(ceph-mon ceph-osd ceph-common librbd-dev librados-dev)

log() { printf '%s: %s\n' "$LAB_NAME" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# ceph_cmd ARGS...: the ceph CLI against our cluster, never hanging longer than TIMEOUT (a CLI
# without a reachable monitor otherwise retries forever).
ceph_cmd() { timeout "$TIMEOUT" ceph -c "$CONF" --connect-timeout 10 "$@"; }
rbd_cmd() { timeout "$TIMEOUT" rbd -c "$CONF" "$@"; }

install_packages() {
    local missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
        apt-get update -qq >/dev/null || die "apt-get update failed"
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
            die "apt-get install ${missing[*]} failed"
    fi
    # The packages enable systemd units; our daemons are started by hand, never by systemd.
}

# pid_of NAME: the pid a daemon wrote to its pid file, if that process is still alive.
pid_of() {
    local f="$DIR/run/$1.pid" pid
    [ -s "$f" ] || return 1
    pid=$(cat "$f")
    kill -0 "$pid" 2>/dev/null || return 1
    echo "$pid"
}

port_in_use() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }

write_conf() {
    local fsid=$1
    mkdir -p "$DIR"/{run,log,mon,osd}
    cat >"$CONF" <<EOF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$PORT_V2,v1:127.0.0.1:$PORT_V1]
mon initial members = a
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
# The lab machines' disks are often nearly full; the monitor refuses to start below 5% free
# by default, and its store here is a few megabytes.
mon data avail crit = 0
mon data avail warn = 0
osd crush chooseleaf type = 0
ms bind ipv6 = false
public network = 127.0.0.0/8
osd objectstore = memstore
memstore device bytes = 1073741824
osd max object name len = 256
osd max object namespace len = 64
run dir = $DIR/run
pid file = $DIR/run/\$name.pid
admin socket = $DIR/run/\$name.asok
log file = $DIR/log/\$name.log
keyring = $DIR/keyring
mon data = $DIR/mon/\$cluster-\$id
osd data = $DIR/osd/\$cluster-\$id
# memstore writes its objects to osd data only when the store is unmounted; the fast shutdown
# (the default) exits without unmounting, and a restarted OSD would come back empty.
osd fast shutdown = false

[client]
# Clients (rbd, librbd in the tests) run many at once: no shared admin socket path.
admin socket =
EOF
}

# wait_for WHAT CMD...: retry CMD once a second until it succeeds or TIMEOUT passes.
wait_for() {
    local what=$1 deadline=$((SECONDS + TIMEOUT))
    shift
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 1
    done
    log "$what after ${SECONDS}s"
}

start_mon() {
    pid_of mon.a >/dev/null && return 0
    ceph-mon -c "$CONF" -i a 2>>"$DIR/log/start.err" ||
        die "ceph-mon did not start (see $DIR/log/mon.a.log, $DIR/log/start.err)"
    wait_for "monitor answering" ceph_cmd mon stat ||
        die "the monitor does not answer within ${TIMEOUT}s (see $DIR/log/mon.a.log)"
}

start_osd() {
    pid_of osd.0 >/dev/null && return 0
    ceph-osd -c "$CONF" -i 0 2>>"$DIR/log/start.err" ||
        die "ceph-osd did not start (see $DIR/log/osd.0.log, $DIR/log/start.err)"
    wait_for "osd.0 up" osd_up || die "osd.0 is not up within ${TIMEOUT}s (see $DIR/log/osd.0.log)"
}

osd_up() { ceph_cmd osd dump 2>/dev/null | grep -q '^osd\.0 up'; }

# probe: the pool is usable when an image can be created, read back and removed.
probe() {
    rbd_cmd rm rbd/.lab-probe >/dev/null 2>&1 || true
    rbd_cmd create rbd/.lab-probe --size 1M &&
        rbd_cmd info rbd/.lab-probe >/dev/null &&
        rbd_cmd rm rbd/.lab-probe >/dev/null 2>&1
}

create_cluster() {
    rm -rf "$DIR"
    local fsid
    fsid=$(cat /proc/sys/kernel/random/uuid)
    write_conf "$fsid"
    ceph-authtool --create-keyring "$DIR/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool "$DIR/keyring" --gen-key -n client.admin --cap mon 'allow *' \
        --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
    monmaptool --create --addv a "[v2:127.0.0.1:$PORT_V2,v1:127.0.0.1:$PORT_V1]" --fsid "$fsid" \
        "$DIR/monmap" >/dev/null
    ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/keyring" \
        2>>"$DIR/log/start.err" || die "ceph-mon --mkfs failed (see $DIR/log/start.err)"
    start_mon
    local id
    id=$(ceph_cmd osd create) || die "ceph osd create failed"
    [ "$id" = 0 ] || die "ceph osd create gave id $id, expected 0"
    mkdir -p "$DIR/osd/ceph-0"
    ceph-osd -c "$CONF" -i 0 --mkfs 2>>"$DIR/log/start.err" >/dev/null ||
        die "ceph-osd --mkfs failed (see $DIR/log/osd.0.log)"
    ceph_cmd osd crush add osd.0 1.0 host=localhost root=default >/dev/null 2>&1 ||
        die "ceph osd crush add failed"
    start_osd
    ceph_cmd osd pool create rbd 8 8 >/dev/null 2>&1 || die "ceph osd pool create rbd failed"
    rbd_cmd pool init rbd || die "rbd pool init failed"
    touch "$DIR/.ready"
}

cmd_start() {
    local t0=$SECONDS
    install_packages
    if [ -f "$DIR/.ready" ] && ! pid_of mon.a >/dev/null && ! pid_of osd.0 >/dev/null; then
        # Both daemons are gone without a clean stop (the session or machine that ran them
        # ended): memstore saved the OSD's objects at some earlier clean shutdown, if ever,
        # while the monitor moved on, so the pool's placement groups may never become
        # active again. Start over.
        log "the cluster in $DIR lost its daemons; creating it anew"
        rm -rf "$DIR"
    fi
    if [ -f "$DIR/.ready" ]; then
        start_mon
        start_osd
    else
        if port_in_use "$PORT_V2" || port_in_use "$PORT_V1"; then
            die "port $PORT_V2 or $PORT_V1 is in use (another cluster? set IMG_CEPH_PORT/IMG_CEPH_PORT_V1)"
        fi
        log "creating the cluster in $DIR"
        create_cluster
    fi
    wait_for "pool rbd usable" probe || die "no RBD image can be created in pool rbd within ${TIMEOUT}s"
    log "ready in $((SECONDS - t0))s"
    echo "$CONF"
}

# stop_daemons SIGNAL: signal each daemon by its pid and wait (bounded) until it is gone.
stop_daemons() {
    local sig=$1 name pid deadline
    for name in osd.0 mon.a; do
        pid=$(pid_of "$name") || continue
        kill "-$sig" "$pid" 2>/dev/null || true
        deadline=$((SECONDS + 30))
        while kill -0 "$pid" 2>/dev/null; do
            if [ $SECONDS -ge $deadline ]; then
                log "$name ($pid) ignores SIG$sig; killing it"
                kill -KILL "$pid" 2>/dev/null || true
            fi
            sleep 0.2
        done
    done
}

cmd_stop() {
    [ -d "$DIR" ] || return 0
    stop_daemons KILL
    rm -rf "$DIR"
    log "stopped and removed $DIR"
}

cmd_restart() {
    [ -f "$DIR/.ready" ] || die "no cluster in $DIR (run start first)"
    # SIGTERM, not SIGKILL: memstore writes its objects to the OSD's directory only on a clean
    # shutdown, and the images must survive the restart.
    stop_daemons TERM
    start_mon
    start_osd
    wait_for "pool rbd usable" probe || die "pool rbd not usable within ${TIMEOUT}s after restart"
    echo "$CONF"
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
restart) cmd_restart ;;
status)
    [ -f "$DIR/.ready" ] || die "no cluster in $DIR"
    ceph_cmd -s
    ;;
conf)
    [ -f "$DIR/.ready" ] || die "no cluster in $DIR"
    echo "$CONF"
    ;;
*)
    echo "usage: $0 start|stop|restart|status|conf" >&2
    exit 2
    ;;
esac

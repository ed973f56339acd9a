#!/usr/bin/env bash
# A real iSCSI target on loopback for the iSCSI tests: tgt's tgtd with one target whose LUNs are
# files in a lab directory (see ../shared/LAB.md, "Network storage").
#
#   scripts/iscsi-lab.sh start [--luns N] [--size SIZE] [--chap USER:PASSWORD]
#                                                          start (or find running) and print URLs;
#                                                          with --chap, logins need CHAP
#   scripts/iscsi-lab.sh stop                              SIGKILL tgtd; the LUN files stay
#   scripts/iscsi-lab.sh restart                           stop, then start on the same port and
#                                                          the same files (reconnection tests)
#   scripts/iscsi-lab.sh urls                              print the URLs of the running lab
#   scripts/iscsi-lab.sh clean                             stop and remove the lab directory
#
# ISCSI_LAB_DIR (default /tmp/img-iscsi-lab) holds the pid, port, logs and LUN files; give each
# concurrent user its own directory and it gets its own tgtd on its own port (the port doubles as
# tgtd's control port, so the management sockets do not collide either).
# ISCSI_LAB_IQN overrides the target name (default iqn.2026-11.test:disk).
#
# Prints one URL per LUN, iscsi://127.0.0.1:PORT/IQN/LUN, on stdout; everything else goes to
# stderr. Exits non-zero with a message when something fails.
set -euo pipefail

DIR=${ISCSI_LAB_DIR:-/tmp/img-iscsi-lab}
IQN=${ISCSI_LAB_IQN:-iqn.2026-11.test:disk}
LUNS=1
SIZE=64M
CHAP=

die() {
    echo "iscsi-lab: $*" >&2
    exit 1
}
say() { echo "iscsi-lab: $*" >&2; }

# Installs tgt and libiscsi (headers for the -sys crate, iscsi-ls for checks) when missing.
ensure_packages() {
    local missing=()
    command -v tgtd >/dev/null || missing+=(tgt)
    command -v iscsi-ls >/dev/null || missing+=(libiscsi-bin)
    [ -e /usr/include/iscsi/iscsi.h ] || missing+=(libiscsi-dev)
    # bindgen loads libclang at build time.
    compgen -G '/usr/lib/llvm-*/lib/libclang.so' >/dev/null || missing+=(libclang-dev)
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing ${missing[*]}"
    # Other lab scripts may be running apt at the same time: wait for the lock instead of failing.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -o DPkg::Lock::Timeout=600 "${missing[@]}" >&2 ||
        die "apt-get install ${missing[*]} failed"
}

running_pid() {
    local pid
    pid=$(cat "$DIR/tgtd.pid" 2>/dev/null) || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = tgtd ] ||
        return 1
    echo "$pid"
}

# Ports handed to labs, one file per port naming the lab directory that owns it.
CLAIMS=/var/run/tgtd/img-iscsi-lab.ports

port_in_use() { ss -Htln "sport = :$1" | grep -q .; }

# 3260 when free, else the first free port above it; a restart keeps the port it had.
choose_port() {
    if [ -s "$DIR/port" ]; then
        cat "$DIR/port"
        return
    fi
    local p owner
    mkdir -p "$CLAIMS"
    for p in 3260 $(seq 3261 3400); do
        port_in_use "$p" && continue
        # A lab being restarted has no listener for a moment: its claim keeps the port its own.
        owner=$(cat "$CLAIMS/$p" 2>/dev/null || true)
        [ -n "$owner" ] && [ "$owner" != "$DIR" ] && [ -d "$owner" ] && continue
        echo "$DIR" >"$CLAIMS/$p"
        echo "$p"
        return
    done
    die "no free port in 3260-3400"
}

tgtadm_() { tgtadm -C "$PORT" --lld iscsi "$@"; }

print_urls() {
    [ -s "$DIR/urls" ] || die "no lab running in $DIR"
    cat "$DIR/urls"
}

start() {
    if running_pid >/dev/null; then
        print_urls
        return
    fi
    ensure_packages
    mkdir -p "$DIR" /var/run/tgtd
    # Labs started at once must not pick the same free port: one start at a time per machine.
    exec 9>/var/run/tgtd/img-iscsi-lab.lock
    flock 9
    PORT=$(choose_port)
    port_in_use "$PORT" && die "port $PORT is in use by another program"
    echo "$PORT" >"$DIR/port"
    # Files are created once: a restart must find the data written before it.
    local n
    for n in $(seq 1 "$LUNS"); do
        [ -e "$DIR/lun$n.img" ] || truncate -s "$SIZE" "$DIR/lun$n.img"
    done
    rm -f "$DIR/urls"
    # -f keeps tgtd in the foreground so that the pid we record is the daemon's own.
    # 9>&- : tgtd must not inherit the start lock, or it would hold it for its whole life.
    setsid tgtd -f -C "$PORT" --iscsi "portal=127.0.0.1:$PORT" >>"$DIR/tgtd.log" 2>&1 </dev/null 9>&- &
    echo $! >"$DIR/tgtd.pid"
    local i
    for i in $(seq 1 100); do
        running_pid >/dev/null || die "tgtd exited at start; see $DIR/tgtd.log: $(tail -3 "$DIR/tgtd.log")"
        tgtadm_ --op show --mode sys >/dev/null 2>&1 && port_in_use "$PORT" && break
        sleep 0.1
    done
    [ "$i" -lt 100 ] || die "tgtd did not come up on port $PORT; see $DIR/tgtd.log"
    tgtadm_ --op new --mode target --tid 1 -T "$IQN" || die "creating target $IQN failed"
    for n in $(seq 1 "$LUNS"); do
        tgtadm_ --op new --mode logicalunit --tid 1 --lun "$n" -b "$DIR/lun$n.img" ||
            die "creating LUN $n failed"
        # Thin provisioning makes tgt accept UNMAP / WRITE SAME with UNMAP (hole punching).
        tgtadm_ --op update --mode logicalunit --tid 1 --lun "$n" --params thin_provisioning=1 ||
            die "enabling thin provisioning on LUN $n failed"
    done
    tgtadm_ --op bind --mode target --tid 1 -I ALL || die "binding the target failed"
    if [ -n "$CHAP" ]; then
        # Initiators must then log in with this CHAP user and password.
        tgtadm_ --op new --mode account --user "${CHAP%%:*}" --password "${CHAP#*:}" ||
            die "creating the CHAP account failed"
        tgtadm_ --op bind --mode account --tid 1 --user "${CHAP%%:*}" ||
            die "binding the CHAP account failed"
        echo "$CHAP" >"$DIR/chap"
    fi
    for n in $(seq 1 "$LUNS"); do
        echo "iscsi://127.0.0.1:$PORT/$IQN/$n"
    done >"$DIR/urls"
    say "tgtd pid $(cat "$DIR/tgtd.pid") on 127.0.0.1:$PORT, files in $DIR"
    print_urls
}

stop() {
    local pid
    if pid=$(running_pid); then
        # tgtd ignores SIGTERM.
        kill -KILL "$pid"
        local i
        for i in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.05
        done
        kill -0 "$pid" 2>/dev/null && die "tgtd $pid did not die"
        say "stopped tgtd $pid"
    fi
    rm -f "$DIR/tgtd.pid"
    if [ -s "$DIR/port" ]; then
        rm -f "/var/run/tgtd/socket.$(cat "$DIR/port")" "/var/run/tgtd/socket.$(cat "$DIR/port").lock"
    fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
while [ $# -gt 0 ]; do
    case $1 in
    --luns) LUNS=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --chap) CHAP=$2; shift 2 ;;
    *) die "unknown option $1" ;;
    esac
done
[[ $LUNS =~ ^[1-9][0-9]*$ ]] || die "--luns wants a positive number"

case $cmd in
start) start ;;
stop) stop ;;
restart)
    [ -s "$DIR/port" ] || die "no lab in $DIR to restart"
    # Keep the number of LUNs the lab had.
    [ -s "$DIR/urls" ] && LUNS=$(wc -l <"$DIR/urls")
    [ -s "$DIR/chap" ] && CHAP=$(cat "$DIR/chap")
    stop
    start
    ;;
urls) print_urls ;;
clean)
    stop
    [ -s "$DIR/port" ] && rm -f "$CLAIMS/$(cat "$DIR/port")"
    rm -rf "$DIR"
    ;;
*) die "usage: $0 start [--luns N] [--size SIZE] [--chap USER:PASSWORD] | stop | restart | urls | clean" ;;
esac

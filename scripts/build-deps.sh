#!/bin/sh
# Installs the Debian packages the workspace needs to build: the iSCSI and Ceph RBD client
# libraries (their -sys crates generate bindings from the headers with bindgen, which needs
# libclang). Installs only what is missing; run as root on a fresh machine.
set -eu
PACKAGES="libiscsi-dev librbd-dev librados-dev libclang-dev pkg-config"
missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
echo "build-deps: installing$missing" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# shellcheck disable=SC2086 # one word per package
apt-get install -y -q --no-install-recommends $missing

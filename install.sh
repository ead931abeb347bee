#!/bin/sh
# Installs everything Bonneville needs on Debian 12 (run as root): system packages (docker.io,
# containerd and libvirtd too, for the integration tests, and crun and runsc for the benchmarks;
# no daemon is started), a venv in /opt/bonneville/venv with this checkout installed (editable),
# `bonneville` on PATH, and the guest image built under /var/lib/bonneville.
set -eu
cd "$(dirname "$0")"
if [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root (it installs Debian packages)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
PACKAGES="python3 python3-venv python3-dev python3-seccomp gcc
    golang-go golang-github-vmware-govmomi-dev xorriso isolinux syslinux-common
    qemu-system-x86 qemu-utils linux-image-amd64 busybox-static
    kmod cpio xz-utils iproute2 procps ca-certificates openssl tar
    docker.io containerd runc iptables crun runsc containernetworking-plugins
    golang-go git util-linux
    libvirt-daemon-system libvirt-dev pkg-config"
# Only what is missing: a machine that has everything installs nothing (and needs no network).
missing=""
for p in $PACKAGES; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    apt-get update -q
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing
fi
VENV=/opt/bonneville/venv
# Debian's own interpreter: the guest image carries this same Python.
[ -x "$VENV/bin/python" ] || /usr/bin/python3 -m venv "$VENV"
# No build isolation: with its build tools in the venv, a re-install needs no index.
"$VENV/bin/pip" install -q wheel 'setuptools>=66'
# The libvirt extra builds libvirt-python against Debian's libvirt (libvirt-dev, pkg-config).
"$VENV/bin/pip" install -q --no-build-isolation -e '.[test,vsphere,libvirt]'
# pip byte-compiles what it installs, but an editable install runs our sources in place: compile
# them too, or every `bonneville` call compiles them again where PYTHONDONTWRITEBYTECODE is set
# (~30 ms of each CLI call here; docker calls the CLI four times per `docker run`). bonneville/
# holds links to the folders (compileall does not follow them): the folders by their own names.
"$VENV/bin/python" -m compileall -q -j0 bonneville shim spec backends guest
# The `bonneville` command starts Python without `site` (-S): `python3 -S -c pass` takes 7.7 ms
# here, 20.9 ms with site (its .pth processing, the editable install's import finder above all),
# and `bonneville state x` 37 ms, 41 ms with site (hyperfine, medians of 300), with docker calling
# the CLI four times per `docker run`. So the launcher puts this checkout first
# on sys.path (its bonneville/ package is the code; tests/support.py writes the same launcher
# for the checkout a test run comes from) and the venv's site-packages (the dependencies) last.
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
rm -f /usr/local/bin/bonneville
cat >/usr/local/bin/bonneville <<EOF
#!$VENV/bin/python3 -S
# Written by install.sh (see there).
import sys

sys.path[:0] = ["$PWD"]
sys.path.append("$SITE")
from bonneville.shim.entry import main

main()
EOF
chmod 755 /usr/local/bin/bonneville
# Installs before this one reached the checkout through a tree of links here.
rm -rf /opt/bonneville/lib
bonneville image build
# The templates docker needs most (no NIC and one NIC): the first container starts as a clone.
bonneville template build
# An upgrade leaves the previous guest image and the templates saved from it: unusable now.
bonneville image prune >/dev/null
bonneville template prune
echo "bonneville installed: $(command -v bonneville)"

#!/bin/sh
# Installs everything Bonneville needs on Debian 12 (run as root): system packages (docker.io
# and containerd too, for the integration tests; no daemon is started), a venv in
# /opt/bonneville/venv with this checkout installed (editable), `bonneville` on PATH, and the
# guest image built under /var/lib/bonneville.
set -eu
cd "$(dirname "$0")"
if [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root (it installs Debian packages)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends \
    python3 python3-venv python3-dev gcc \
    qemu-system-x86 qemu-utils linux-image-amd64 busybox-static \
    kmod cpio xz-utils iproute2 procps ca-certificates tar \
    docker.io containerd runc iptables
VENV=/opt/bonneville/venv
# Debian's own interpreter: the guest image carries this same Python.
[ -x "$VENV/bin/python" ] || /usr/bin/python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q -e '.[test]'
ln -sf "$VENV/bin/bonneville" /usr/local/bin/bonneville
bonneville image build
echo "bonneville installed: $(command -v bonneville)"

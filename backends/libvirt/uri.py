"""Which libvirt a container uses, and the files an embedded driver needs.

The URI is a property of the container: it is chosen at create (``--libvirt-uri``, then
``$BONNEVILLE_LIBVIRT_URI``, then ``[libvirt] uri`` in the configuration file, else
``qemu:///system`` when libvirtd's socket exists and ``qemu:///embed`` otherwise) and recorded
in the VM's private state, so later commands reach the same libvirt.

``qemu:///embed?root=DIR`` names the *parent* of the embed roots: libvirt lets one process at a
time hold a root, and every container's monitor holds its own (``DIR/<key>``). Roots must stay
short: libvirt puts QEMU's monitor socket under them, and unix socket paths end at 107 bytes.
"""

from __future__ import annotations

import errno
import filecmp
import os
import re
import shutil
import socket
import tempfile
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

from bonneville.spec.errors import BackendError

URI_ENV = "BONNEVILLE_LIBVIRT_URI"
SYSTEM_URI = "qemu:///system"
EMBED_URI = "qemu:///embed"
# libvirt 9 clients use the modular daemon's socket when it exists, else libvirtd's.
SYSTEM_SOCKETS = ("/run/libvirt/virtqemud-sock", "/run/libvirt/libvirt-sock")
SYSTEM_RUN_DIR = "/run/libvirt/qemu"  # libvirtd's QEMU pid files
DEFAULT_EMBED_BASE = "/run/bonneville/lv"
SYSTEM_SOCKET_BASE = "/run/bonneville/libvirt-system"
# A copy of the QEMU capabilities an embedded driver probed (4 s under TCG); new roots start
# from it, and libvirt re-probes by itself if QEMU or libvirt changed since.
CAPS_SEED_DIR = "/var/lib/bonneville/libvirt/qemu-capabilities"
CAPS_SUBDIR = os.path.join("cache", "qemu", "capabilities")
# Longest root such that <root>/lib/qemu/domain-NNNNN-<20 chars>/monitor.sock fits in 107 bytes.
MAX_EMBED_ROOT = 60
_KEY = re.compile(r"^[0-9a-f]{16}$")


@dataclass(frozen=True)
class Target:
    uri: str  # as recorded in the container's state
    embedded: bool
    embed_base: str = ""  # embedded: the parent of per-container roots
    socket_path: str = ""  # daemon: the unix socket the client will use (for preflight)


def default_uri(environ: Mapping[str, str] | None = None) -> str:
    from bonneville.spec import settings

    configured = settings.get("libvirt", "uri", env=URI_ENV, environ=environ)
    if configured:
        return str(configured)
    return SYSTEM_URI if any(os.path.exists(p) for p in SYSTEM_SOCKETS) else EMBED_URI


def parse(uri: str) -> Target:
    """What ``uri`` means for us; BackendError for anything we cannot run containers on."""
    parts = urllib.parse.urlsplit(uri)
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    usage = f"unsupported libvirt URI {uri!r}: use qemu:///system or qemu:///embed[?root=DIR]"
    if parts.netloc:
        # The share and the taps are local: a remote libvirtd cannot reach them.
        raise BackendError(f"{usage} (a remote host cannot reach the container's files)")
    if parts.scheme == "qemu" and parts.path == "/embed":
        base = query.get("root", [DEFAULT_EMBED_BASE])[-1]
        if not os.path.isabs(base):
            raise BackendError(f"libvirt URI {uri!r}: root must be an absolute path")
        base = os.path.normpath(base)
        if len(base) + 17 > MAX_EMBED_ROOT:
            raise BackendError(
                f"libvirt URI {uri!r}: root {base} is too long for unix sockets "
                f"(at most {MAX_EMBED_ROOT - 17} characters)"
            )
        return Target(uri=uri, embedded=True, embed_base=base)
    if parts.scheme in ("qemu", "qemu+unix") and parts.path == "/system":
        sock = query.get("socket", [""])[-1]
        if not sock:
            sock = next((p for p in SYSTEM_SOCKETS if os.path.exists(p)), SYSTEM_SOCKETS[-1])
        return Target(uri=uri, embedded=False, socket_path=sock)
    raise BackendError(usage)


def preflight(uri: str) -> Target:
    """Check, without importing libvirt, that ``uri`` can work here: one clear line if not."""
    import importlib.util

    target = parse(uri)
    if importlib.util.find_spec("libvirt") is None:
        raise BackendError(
            "backend libvirt needs libvirt-python (pip install 'bonneville[libvirt]')"
        )
    if target.embedded:
        return target
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(5)
        sock.connect(target.socket_path)
    except OSError as exc:
        raise BackendError(_socket_problem(uri, target.socket_path, exc.errno)) from exc
    finally:
        sock.close()
    return target


def _socket_problem(uri: str, path: str, err: int | None) -> str:
    if err in (errno.ENOENT, errno.ECONNREFUSED):
        return (
            f"libvirt URI {uri}: libvirtd is not running (no daemon on {path}); start it, or "
            f"use --libvirt-uri {EMBED_URI} to run without a daemon"
        )
    if err in (errno.EACCES, errno.EPERM):
        return f"libvirt URI {uri}: permission denied on {path} (run as root)"
    return f"libvirt URI {uri}: cannot reach libvirtd on {path}: {os.strerror(err or 0)}"


def explain_connect_error(uri: str, message: str) -> str:
    """libvirt's own reason, prefixed with what we were doing."""
    return f"libvirt URI {uri}: cannot connect: {message}"


def embed_root(target: Target, key: str) -> str:
    return os.path.join(target.embed_base, key)


def embed_uri(root: str) -> str:
    return f"{EMBED_URI}?root={urllib.parse.quote(root, safe='/')}"


def system_socket_dir(key: str) -> str:
    return os.path.join(SYSTEM_SOCKET_BASE, key)


def is_ours(path: str) -> bool:
    """A directory this backend made for one container (its name is a 16-hex key)."""
    return bool(_KEY.match(os.path.basename(path))) and os.path.isabs(path)


def prepare_embed_root(root: str, qemu_conf: str) -> None:
    """A fresh root with our QEMU driver configuration and the host's probed capabilities."""
    os.makedirs(os.path.dirname(root), mode=0o755, exist_ok=True)
    os.mkdir(root, 0o700)
    os.mkdir(os.path.join(root, "etc"), 0o700)
    with open(os.path.join(root, "etc", "qemu.conf"), "w", encoding="utf-8") as f:
        f.write(qemu_conf)
    caps = os.path.join(root, CAPS_SUBDIR)
    os.makedirs(caps, mode=0o700)
    try:
        names = [n for n in os.listdir(CAPS_SEED_DIR) if n.endswith(".xml")]
    except OSError:
        return
    for name in names:
        try:
            shutil.copyfile(os.path.join(CAPS_SEED_DIR, name), os.path.join(caps, name))
        except OSError:
            continue  # only a cache: libvirt probes what is missing


def export_capabilities(root: str) -> None:
    """Offer what this root's driver probed to future roots (atomically: others read it)."""
    caps = os.path.join(root, CAPS_SUBDIR)
    try:
        names = [n for n in os.listdir(caps) if n.endswith(".xml")]
        os.makedirs(CAPS_SEED_DIR, mode=0o755, exist_ok=True)
    except OSError:
        return
    for name in names:
        source = os.path.join(caps, name)
        target = os.path.join(CAPS_SEED_DIR, name)
        try:
            if os.path.exists(target) and filecmp.cmp(source, target, shallow=False):
                continue
            fd, tmp = tempfile.mkstemp(dir=CAPS_SEED_DIR, prefix=".tmp-")
            os.close(fd)
            try:
                shutil.copyfile(source, tmp)
                os.chmod(tmp, 0o644)
                os.rename(tmp, target)
            except OSError:
                os.unlink(tmp)
                raise
        except OSError:
            continue

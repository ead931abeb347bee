"""vcsim for the vSphere tests: built from Debian's govmomi source, started, inspected, stopped.

It serves plain http, or https with a certificate a test CA made here signed
(`make_certificates`, the `openssl` CLI): integration/test_vsphere_tls.py.

The launcher is ours (integration/vcsim/main.go); the simulator is govmomi's, built offline in
GOPATH mode against /usr/share/gocode into a cache directory under /tmp (never committed).
vcsim speaks the real vSphere API but runs nothing inside its VMs: `StandInGuest` plays the
guest's part over the real transport (it reads the serial port's URI and the token from the
VM's configuration through the API, as ESXi and the guest would, connects, sends the preamble,
and runs the real agent in host mode on that connection).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bonneville.backends.vsphere.config import VSphereSettings
from bonneville.backends.vsphere.connection import session
from bonneville.backends.vsphere.inventory import children, resolve
from bonneville.backends.vsphere.tls import certificate_thumbprint
from bonneville.backends.vsphere.transport import preamble
from bonneville.backends.vsphere.vmomi import vmomi
from tests.support import terminate

LAUNCHER = Path(__file__).parent / "vcsim" / "main.go"
GOPATH = "/usr/share/gocode"
GOVMOMI = f"{GOPATH}/src/github.com/vmware/govmomi/simulator"
BUILD_ROOT = Path("/tmp/bonneville-vcsim-build")
START_TIMEOUT = 60.0
BUILD_TIMEOUT = 600.0
USERNAME = "bonneville"
GUESTS: list[StandInGuest] = []  # reaped by reap_guests() when a test ends


def build_vcsim() -> Path:
    """The launcher binary, built once per (source, Go version) into a cache directory."""
    go = shutil.which("go")
    if go is None or not os.path.isdir(GOVMOMI):
        pytest.fail("vcsim needs golang-go and golang-github-vmware-govmomi-dev (install.sh)")
    version = subprocess.run([go, "version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(LAUNCHER.read_bytes() + version.encode()).hexdigest()[:16]
    out_dir = BUILD_ROOT / key
    binary = out_dir / "vcsim"
    if binary.is_file():
        return binary
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(out_dir),
        "GO111MODULE": "off",
        "GOPATH": GOPATH,
        "GOCACHE": str(BUILD_ROOT / "gocache"),
        "GOFLAGS": "",
    }
    tmp = out_dir / f"vcsim.{os.getpid()}"
    subprocess.run(
        [go, "build", "-o", str(tmp), "."],
        cwd=LAUNCHER.parent,
        env=env,
        check=True,
        timeout=BUILD_TIMEOUT,
        close_fds=True,
    )
    tmp.rename(binary)
    return binary


@dataclass
class Vcsim:
    url: str
    username: str
    password: str
    proc: subprocess.Popen[bytes]
    # The TLS settings the helpers here reach this vcsim with (over https: its CA).
    trust: dict[str, Any] = field(default_factory=dict)

    def settings(self, **overrides: Any) -> VSphereSettings:
        values: dict[str, Any] = {
            "url": self.url,
            "username": self.username,
            "password": self.password,
            "listen_host": "127.0.0.1",
            "advertise_host": "127.0.0.1",
            **self.trust,
        }
        values.update(overrides)
        return VSphereSettings(**values)


@pytest.fixture(scope="session")
def vcsim() -> Iterator[Vcsim]:
    with start_vcsim() as vc:
        yield vc


@dataclass(frozen=True)
class Certificates:
    """A test CA and the server certificate it signed for 127.0.0.1, as PEM files."""

    ca: Path
    cert: Path
    key: Path
    thumbprint: str  # the server certificate's, sha256:AB:CD:…


def make_certificates(directory: Path) -> Certificates:
    """A fresh CA and a server certificate for IP 127.0.0.1 signed by it (openssl CLI)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key, csr = directory / "server.pem", directory / "server.key", directory / "server.csr"
    ext = directory / "server.ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )

    def openssl(*args: object) -> None:
        argv = ["openssl", *map(str, args)]
        env = {"PATH": "/usr/bin:/bin"}
        subprocess.run(argv, capture_output=True, check=True, close_fds=True, env=env)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(
        *("req", "-x509", *ec, "-days", "2", "-keyout", ca_key, "-out", ca),
        *("-subj", "/CN=bonneville test CA"),
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign"),
    )
    openssl("req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    openssl(
        *("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial"),
        *("-out", cert, "-days", "2", "-extfile", ext),
    )
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    return Certificates(ca, cert, key, certificate_thumbprint(der))


@contextlib.contextmanager
def start_vcsim(certificates: Certificates | None = None) -> Iterator[Vcsim]:
    """A vcsim of its own, until the block ends: over https with ``certificates`` (the helpers
    here then trust its CA), else over http."""
    binary = build_vcsim()
    password = secrets.token_hex(12)
    argv = [str(binary), "-listen", "127.0.0.1:0"]
    trust: dict[str, Any] = {}
    if certificates is not None:
        argv += ["-tls-cert", str(certificates.cert), "-tls-key", str(certificates.key)]
        trust = {"ca_file": str(certificates.ca)}
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env={"PATH": "/usr/bin:/bin", "VCSIM_USERNAME": USERNAME, "VCSIM_PASSWORD": password},
        close_fds=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()  # the launcher prints it once it serves
        if not line.startswith("VCSIM_URL "):
            pytest.fail(f"vcsim did not start: {line!r}")
        yield Vcsim(line.split()[1], USERNAME, password, proc, trust)
    finally:
        terminate(proc, timeout=15)


# ---- looking at vcsim through the API --------------------------------------------------------


def vms(si: Any) -> dict[str, Any]:
    vim = vmomi().vim
    return {vm.name: vm for vm in children(si, si.content.rootFolder, vim.VirtualMachine)}


def extra_config(vm: Any) -> dict[str, str]:
    return {o.key: str(o.value) for o in vm.config.extraConfig or []}


def container_vms(si: Any, container_id: str) -> list[Any]:
    """Every VM vSphere lists for ``container_id`` (more than one while a fallback replaces a
    failed clone)."""
    return [
        vm
        for vm in vms(si).values()
        if vm.config is not None and extra_config(vm).get("bonneville.container-id") == container_id
    ]


def container_vm(si: Any, container_id: str) -> Any:
    found = container_vms(si, container_id)
    return found[0] if found else None


def datastore_files(vc: Vcsim) -> list[str]:
    with session(vc.settings()) as si:
        inv = resolve(si, vc.settings())
        return inv.datastore.listing("")


def datastore_dir(vc: Vcsim) -> Path:
    """Where vcsim keeps the datastore's files on this machine (its summary URL)."""
    with session(vc.settings()) as si:
        inv = resolve(si, vc.settings())
        return Path(inv.datastore.ds.summary.url)


def _ours_to_keep(path: str) -> bool:
    return (
        path == "bonneville"
        or (path.startswith("bonneville/boot-") and path.endswith(".iso"))
        or path.startswith("bonneville-template-")
    )


def leftovers(vc: Vcsim) -> tuple[list[str], list[str]]:
    """(VMs that are not templates, datastore files that are not the ISO or a template's),
    the files both as the API lists them and as vcsim stores them on this machine's disk."""
    with session(vc.settings()) as si:
        names = sorted(n for n in vms(si) if not n.startswith("bonneville-template-"))
        inv = resolve(si, vc.settings())
        files = [f for f in inv.datastore.listing("") if not _ours_to_keep(f)]
        local = Path(inv.datastore.ds.summary.url)
    on_disk = [
        str(p.relative_to(local))
        for p in sorted(local.rglob("*"))
        if not _ours_to_keep(str(p.relative_to(local)))
    ]
    return names, sorted(set(files) | {f"(disk) {f}" for f in on_disk})


# ---- the guest's part ------------------------------------------------------------------------


def reap_guests() -> None:
    while GUESTS:
        GUESTS.pop().reap()


class StandInGuest:
    """Plays ESXi + guest for one container: connects to the VM's serial URI when it powers on,
    proves the token, and runs the real agent (host mode, ``root``) on the connection."""

    def __init__(
        self,
        vc: Vcsim,
        container_id: str,
        root: Path,
        token: str | None = None,
        ignore_vms: set[str] | None = None,
    ) -> None:
        self.vc = vc
        # Play a guest that never answers in these VMs (by moref: instant clones that are not
        # fork-aware), and the real one in the next. The caller fills the set as it makes them,
        # so a VM this thread never saw (it came and went while the thread logged in) cannot be
        # mistaken for the one to serve.
        self.ignore_vms = ignore_vms if ignore_vms is not None else set()
        self.container_id = container_id
        self.root = root
        self.forced_token = token
        self.agent: subprocess.Popen[bytes] | None = None
        self.error: BaseException | None = None
        self.vm_seen: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)
        GUESTS.append(self)

    def __enter__(self) -> StandInGuest:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(timeout=120)

    def reap(self) -> None:
        """Wait for the agent, which ends when the monitor closes the channel."""
        if self.agent is not None:
            try:
                self.agent.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait()
                raise AssertionError("the agent outlived its channel") from None

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:
            self.error = exc

    def _serve(self) -> None:
        deadline = time.monotonic() + 120
        with session(self.vc.settings()) as si:
            while time.monotonic() < deadline:
                candidates = [
                    vm
                    for vm in container_vms(si, self.container_id)
                    if vm._moId not in self.ignore_vms
                ]
                vm = candidates[0] if candidates else None
                if vm is not None and str(vm.runtime.powerState) == "poweredOn":
                    extra = extra_config(vm)
                    self.vm_seen = {"name": vm.name, "extra": extra}
                    break
                time.sleep(0.1)
            else:
                raise AssertionError(f"no powered-on VM for {self.container_id}")
        uri = urllib.parse.urlsplit(extra["guestinfo.bonneville.channel"])
        token = self.forced_token or extra["guestinfo.bonneville.token"]
        conn = socket.create_connection((uri.hostname, uri.port), timeout=30)
        # A UART may carry noise before the agent's line: the listener must skip it.
        conn.sendall(b"\r\n" + preamble(token))
        conn.settimeout(None)
        if self.forced_token:
            conn.close()
            return
        # The agent's share holds a tree per container (docs/protocol.md): its root is ours.
        share = self.root.parent / f"standin-share-{self.container_id}"
        tree = share / self.container_id
        tree.mkdir(parents=True, exist_ok=True)
        if not (tree / "root").exists():
            (tree / "root").symlink_to(self.root)
        with open(self.root.parent / "agent.log", "ab") as log:
            self.agent = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bonneville.guest.agent",
                    "--fd",
                    str(conn.fileno()),
                    "--root",
                    str(share),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(conn.fileno(),),
                close_fds=True,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": ":".join(sys.path)},
            )
        conn.close()

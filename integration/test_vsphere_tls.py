"""TLS to vSphere, against a vcsim serving https with a certificate of its own.

A test CA made here (`make_certificates`) signs vcsim's certificate for 127.0.0.1. The CLI runs
a container end to end (the stand-in guest of integration/vsphere_env.py plays the VM) when the
server is verified against `ca_file`, pinned by `thumbprint` with no CA at all, or not verified
(`insecure`, which the monitor's log must warn about); a wrong pin, an unknown CA or another
CA's `ca_file` fail `create` with one line and leave no VM, no datastore file and no state
directory behind. A plain TLS server of our own then shows that the pin is checked before a
byte of the request — the login's password, the datastore upload's session cookie — is sent.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bonneville.backends.vsphere import tls
from bonneville.backends.vsphere.config import VSphereSettings
from bonneville.backends.vsphere.connection import connect, session
from bonneville.backends.vsphere.datastore import Datastore
from bonneville.spec.errors import BackendError
from integration.test_vsphere import make_bundle, wait_status, write_config
from integration.vsphere_env import (
    Certificates,
    StandInGuest,
    Vcsim,
    leftovers,
    make_certificates,
    reap_guests,
    start_vcsim,
)
from tests.support import Runtime

INSECURE_WARNING = "is not verified (vsphere.insecure)"
WRONG_PIN = "sha256:" + ":".join(["5A"] * 32)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("vcsim-tls"))


@pytest.fixture(scope="module")
def vcsim_tls(certificates: Certificates) -> Iterator[Vcsim]:
    with start_vcsim(certificates) as vc:
        assert vc.url.startswith("https://127.0.0.1:"), vc.url
        yield vc


@pytest.fixture
def backend_name(vcsim_tls: Vcsim) -> Iterator[str]:
    """`runtime` on vSphere (each test writes its config); no VM or file of its may be left."""
    yield "vsphere"
    reap_guests()
    assert leftovers(vcsim_tls) == ([], [])


def use_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, vc: Vcsim, **trust: Any) -> None:
    config = write_config(tmp_path / "config.toml", vc, **trust)
    monkeypatch.setenv("BONNEVILLE_CONFIG", str(config))


def trust_modes(certificates: Certificates) -> dict[str, dict[str, Any]]:
    bare = certificates.thumbprint.removeprefix("sha256:").replace(":", "").lower()
    return {
        "ca_file": {"ca_file": str(certificates.ca)},
        "thumbprint": {"thumbprint": certificates.thumbprint},
        "thumbprint-bare-hex": {"thumbprint": bare},
        "insecure": {"insecure": True},
    }


@pytest.mark.parametrize("mode", ["ca_file", "thumbprint", "thumbprint-bare-hex", "insecure"])
def test_a_verified_pinned_or_insecure_server_runs_the_container(
    runtime: Runtime,
    vcsim_tls: Vcsim,
    certificates: Certificates,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:
    """create (session, ISO and disk uploads over https), start, the process's exit, delete."""
    use_config(monkeypatch, tmp_path, vcsim_tls, **trust_modes(certificates)[mode])
    bundle = make_bundle(tmp_path, ["sh", "-c", "echo ran > /ran"])
    rootfs = bundle / "rootfs"
    with StandInGuest(vcsim_tls, "v1", rootfs) as guest:
        runtime("create", "--bundle", str(bundle), "v1", check=True)
    assert guest.error is None, guest.error
    runtime("start", "v1", check=True)
    wait_status(runtime, "v1", "stopped")
    assert (rootfs / "ran").read_text() == "ran\n"
    monitor_log = (runtime.root / "v1" / "monitor.log").read_text()
    # Every session the monitor opened (the launch's, the watcher's) warned.
    warnings = monitor_log.count(INSECURE_WARNING)
    assert warnings >= 2 if mode == "insecure" else warnings == 0, monitor_log
    runtime("delete", "v1", check=True)
    assert not (runtime.root / "v1").exists()
    assert leftovers(vcsim_tls) == ([], [])


@pytest.mark.parametrize("mode", ["wrong thumbprint", "no CA", "another CA's ca_file"])
def test_an_untrusted_server_fails_create_with_one_clear_line(
    runtime: Runtime,
    vcsim_tls: Vcsim,
    certificates: Certificates,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:
    url = vcsim_tls.url
    if mode == "wrong thumbprint":
        use_config(monkeypatch, tmp_path, vcsim_tls, thumbprint=WRONG_PIN)
        wanted = (
            f"TLS: {url} presented certificate {certificates.thumbprint}, "
            f"not the one vsphere.thumbprint pins ({WRONG_PIN})"
        )
    elif mode == "no CA":
        use_config(monkeypatch, tmp_path, vcsim_tls)
        wanted = (
            f"TLS verification of {url} failed (unable to get local issuer certificate): "
            "set vsphere.ca_file to the CA that signed its certificate, or vsphere.thumbprint "
            "to the certificate's SHA-256 thumbprint"
        )
    else:
        other = make_certificates(tmp_path / "other-ca").ca
        use_config(monkeypatch, tmp_path, vcsim_tls, ca_file=str(other))
        wanted = (
            f"TLS verification of {url} against vsphere.ca_file {other} failed "
            "(unable to get local issuer certificate)"
        )
    bundle = make_bundle(tmp_path, ["true"])
    result = runtime("create", "--bundle", str(bundle), "u1")
    assert result.returncode == 1
    assert result.stderr.decode() == f"bonneville: {wanted}\n"
    assert vcsim_tls.password.encode() not in result.stderr
    assert not (runtime.root / "u1").exists()
    assert leftovers(vcsim_tls) == ([], [])


def test_a_pin_stands_in_for_the_host_name_too(
    vcsim_tls: Vcsim, certificates: Certificates
) -> None:
    """The certificate names 127.0.0.1 only: reached as `localhost`, a CA check refuses it,
    its pin does not."""
    url = vcsim_tls.url.replace("127.0.0.1", "localhost")
    with pytest.raises(BackendError, match="Hostname mismatch"):
        connect(vcsim_tls.settings(url=url))
    pinned = vcsim_tls.settings(url=url, ca_file="", thumbprint=certificates.thumbprint)
    with session(pinned) as si:
        assert si.content.about.apiVersion


class RecordingServer:
    """A TLS server with vcsim's certificate that records what each client sends after its
    handshake, until the client closes or stays silent for a second, and answers nothing."""

    def __init__(self, certificates: Certificates) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(certificates.cert, certificates.key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            data = b""
            with conn:
                conn.settimeout(1)
                # A client that hangs up right after its handshake may make the server's end
                # of it (session tickets) fail: that client sent nothing either.
                with (
                    contextlib.suppress(OSError),
                    self.context.wrap_socket(conn, server_side=True) as tls_conn,
                ):
                    while chunk := tls_conn.recv(65536):
                        data += chunk
            self.received.append(data)

    def wait(self, connections: int) -> list[bytes]:
        deadline = time.monotonic() + 10
        while len(self.received) < connections:
            assert time.monotonic() < deadline, self.received
            time.sleep(0.05)
        return self.received

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def recording_server(certificates: Certificates) -> Iterator[RecordingServer]:
    server = RecordingServer(certificates)
    yield server
    server.close()


def upload_to(url: str, cfg: VSphereSettings, local: Path) -> None:
    """A datastore upload with a session cookie, as the backend makes it."""
    session = SimpleNamespace(_stub=SimpleNamespace(cookie="vmware_soap_session=secret; Path=/"))
    named = SimpleNamespace(name="DC0")
    Datastore(session, named, named, url, tls.ssl_context(cfg)).upload(str(local), "dir/disk")


def test_a_wrong_pin_ends_the_connection_before_anything_is_sent(
    recording_server: RecordingServer, certificates: Certificates, tmp_path: Path
) -> None:
    url = f"https://127.0.0.1:{recording_server.port}/sdk"
    wrong = VSphereSettings(url=url, username="u", password="secret", thumbprint=WRONG_PIN)
    with pytest.raises(BackendError, match=r"not the one vsphere\.thumbprint pins"):
        connect(wrong)
    local = tmp_path / "disk"
    local.write_bytes(b"x" * 4096)
    # The datastore's HTTP transfers wrap their sockets with the same context.
    with pytest.raises(BackendError, match="is not the pinned"):
        upload_to(url, wrong, local)
    assert recording_server.wait(2) == [b"", b""]
    # The same upload with the right pin does send its request (the server never answers).
    right = VSphereSettings(
        url=url, username="u", password="secret", thumbprint=certificates.thumbprint
    )
    with pytest.raises(BackendError, match="uploading"):
        upload_to(url, right, local)
    sent = recording_server.wait(3)[2]
    assert sent.startswith(b"PUT /folder/dir/disk?dcPath=DC0&dsName=DC0 HTTP/1.1\r\n"), sent
    assert b"Cookie: vmware_soap_session=secret" in sent

"""containerd directly: `ctr run --runc-binary bonneville`, through the runc shim v2.

containerd runs with its own root, state and socket; the busybox image is an OCI archive we
write ourselves and `ctr image import`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.backends import BACKENDS, URIS, use_backend
from tests.support import leftover_processes, make_busybox_rootfs, stop_daemon

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(shutil.which("containerd") is None, reason="containerd is not installed"),
]

IMAGE = "docker.io/bonneville/busybox:test"


def oci_archive(rootfs: Path) -> bytes:
    """An OCI image layout tar with one uncompressed layer holding ``rootfs``."""
    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w") as layer:
        layer.add(rootfs, arcname=".")
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> dict[str, object]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"digest": digest, "size": len(data)}

    layer_desc = blob(layer_buf.getvalue())
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["sh"], "Env": ["PATH=/bin:/sbin"]},
        "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},
    }
    config_desc = blob(json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config_desc},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **layer_desc}],
    }
    manifest_desc = blob(json.dumps(manifest).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **manifest_desc,
                "annotations": {"io.containerd.image.name": IMAGE},
            }
        ],
    }
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        files = {
            "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
            "index.json": json.dumps(index).encode(),
            **{f"blobs/sha256/{d.split(':')[1]}": data for d, data in blobs.items()},
        }
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


class Ctr:
    def __init__(self, address: str, base: Path | None = None) -> None:
        self.address = address
        self.base = base or Path("/nonexistent")  # the daemon's private directory
        self.binary = str(shutil.which("bonneville"))  # what the runc shim runs

    def __call__(
        self, *args: str, input: bytes | None = None, timeout: float = 180
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["ctr", "--address", self.address, *args],
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )

    def run(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return self("run", "--rm", "--runc-binary", self.binary, *args, input=input)


@pytest.fixture(params=BACKENDS)
def ctr(request: pytest.FixtureRequest, containerd: Ctr, monkeypatch: pytest.MonkeyPatch) -> Ctr:
    """The shared containerd, running containers through one backend.

    The runc shim's options carry a binary name but no arguments: for libvirt the binary is a
    two-line wrapper adding the global flags, as an operator would install it.
    """
    client = Ctr(containerd.address, containerd.base)
    backend = use_backend(request, monkeypatch)
    if backend == "libvirt":
        wrapper = containerd.base / f"bonneville-{request.param}"
        wrapper.write_text(
            f"#!/bin/sh\nexec {client.binary} --backend libvirt"
            f' --libvirt-uri {URIS[str(request.param)]} "$@"\n'
        )
        wrapper.chmod(0o755)
        client.binary = str(wrapper)
    return client


@pytest.fixture(scope="module")
def containerd() -> Iterator[Ctr]:
    base = Path(tempfile.mkdtemp(prefix="bvc-", dir="/tmp"))
    address = str(base / "containerd.sock")
    config = base / "config.toml"
    config.write_text(
        f'version = 2\nroot = "{base}/root"\nstate = "{base}/state"\n'
        f'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{address}"\n'
    )
    log = open(base / "containerd.log", "wb")  # noqa: SIM115
    daemon = subprocess.Popen(
        ["containerd", "--config", str(config)],
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    client = Ctr(address, base)
    try:
        deadline = time.monotonic() + 60
        while client("version").returncode != 0:
            assert daemon.poll() is None, (base / "containerd.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "containerd did not come up"
            time.sleep(0.2)
        archive = oci_archive(make_busybox_rootfs(base / "rootfs"))
        result = client("image", "import", "-", input=archive)
        assert result.returncode == 0, result.stderr
        yield client
    finally:
        for cid in client("containers", "ls", "-q").stdout.split():
            client("task", "kill", "-s", "KILL", cid.decode())
            client("task", "delete", "-f", cid.decode())
            client("containers", "delete", cid.decode())
        stop_daemon(daemon, base)
        log.close()
        shutil.rmtree(base, ignore_errors=True)
    assert leftover_processes(str(base)) == []


def test_ctr_run_in_a_vm(ctr: Ctr) -> None:
    result = ctr.run(IMAGE, "c1", "sh", "-c", "uname -r; exit 6")
    assert result.returncode == 6, result.stderr
    assert result.stdout.decode().strip() != os.uname().release


def test_ctr_detached_task_exec_and_kill(ctr: Ctr) -> None:
    started = ctr("run", "-d", "--runc-binary", ctr.binary, IMAGE, "c3", "sleep", "1000")
    assert started.returncode == 0, started.stderr
    try:
        tasks = ctr("task", "ls").stdout.decode()
        assert "c3" in tasks and "RUNNING" in tasks
        ran = ctr("task", "exec", "--exec-id", "e1", "c3", "sh", "-c", "echo exec; exit 2")
        assert (ran.returncode, ran.stdout) == (2, b"exec\n")
        assert ctr("task", "kill", "-s", "KILL", "c3").returncode == 0
        deadline = time.monotonic() + 60
        while "STOPPED" not in ctr("task", "ls").stdout.decode():
            assert time.monotonic() < deadline, "the task never stopped"
            time.sleep(0.2)
    finally:
        ctr("task", "delete", "-f", "c3")
        ctr("containers", "delete", "c3")

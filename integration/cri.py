"""containerd's CRI plugin, as a kubelet drives it: a private containerd with runtime handlers
for runc and bonneville, CNI (Debian's bridge + host-local + loopback plugins on a bridge of
our own), locally built pause and busybox images, and a CRI v1 client over gRPC.

The daemon, config and image helpers use the standard library only (``benchmarks/critest.py``
reuses them); the client imports grpc, the CRI stubs and websocket-client when it is made.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support import (
    forwarding_accepted,
    host_links_of_ours,
    leftover_processes,
    make_busybox_rootfs,
    stop_daemon,
)

if TYPE_CHECKING:
    import grpc
    from cri_api.v1 import api_pb2

HANDLERS = ["runc", "bonneville"]

# The sandbox (pause) and test images: names no registry serves, imported with ctr.
PAUSE_IMAGE = "localhost/bonneville/pause:test"
BUSYBOX_IMAGE = "localhost/bonneville/busybox:test"
NAMESPACE = "k8s.io"  # the containerd namespace the CRI plugin uses

# Our own bridge and subnet: not containerd's default (cni0, 10.88.0.0/16) nor the private
# dockerd's (bvtest0, 172.31.250.0/24). One CRI containerd at a time holds them (LOCK).
CNI_NETWORK = "bvcri"
CNI_BRIDGE = "bvcri0"
CNI_SUBNET = "10.88.213.0/24"
CNI_BIN_DIR = "/usr/lib/cni"
LOCK = "/run/lock/bonneville-test-cri.lock"
# libcni keeps each attachment's result here whatever containerd's config says.
CNI_CACHE = Path("/var/lib/cni/results")

# The pause process, PID 1 of every pod: sleeps until SIGTERM/SIGINT (then exits 0) and reaps
# the zombies of a shared-PID pod. C rather than a busybox script: a shell reaps only between
# commands and shows as `sh` in ps; this is Kubernetes' pause.c in miniature, and a static
# binary needs nothing else in its image.
PAUSE_C = r"""
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }

static void reap(int sig) {
    int saved = errno;
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {}
    errno = saved;
}

int main(void) {
    struct sigaction sa = {0};
    sa.sa_handler = stop;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sa.sa_handler = reap;
    sa.sa_flags = SA_NOCLDSTOP | SA_RESTART;
    sigaction(SIGCHLD, &sa, NULL);
    if (getpid() != 1) fprintf(stderr, "pause: not PID 1\n");
    for (;;) pause();
}
"""


# ---- images ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    """A one-layer image: its names and its OCI archive (what `ctr images import` reads)."""

    names: tuple[str, ...]
    archive: Path


def oci_archive(rootfs: Path, names: list[str], config: dict[str, object]) -> bytes:
    """An OCI image layout tar with one uncompressed layer holding ``rootfs``, its image config
    section ``config`` (Cmd, Entrypoint, User, Env...), listed under each of ``names``."""
    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w") as layer:
        layer.add(rootfs, arcname=".")
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> dict[str, object]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"digest": digest, "size": len(data)}

    layer_desc = blob(layer_buf.getvalue())
    image_config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], **config},
        "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},
    }
    config_desc = blob(json.dumps(image_config).encode())
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
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {"io.containerd.image.name": name},
            }
            for name in names
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


def busybox_image_rootfs(rootfs: Path) -> Path:
    """Our busybox rootfs with its applets as hard links to /bin/busybox, as the busybox images
    of a registry have them (a symlinked applet is a different file to `ls -l`, `stat`...)."""
    make_busybox_rootfs(rootfs)
    bin_dir = rootfs / "bin"
    for entry in bin_dir.iterdir():
        if entry.is_symlink():
            entry.unlink()
            os.link(bin_dir / "busybox", entry)
    return rootfs


def pause_image_rootfs(rootfs: Path) -> Path:
    """A rootfs holding only ``/pause``, compiled here (statically) from PAUSE_C."""
    rootfs.mkdir(parents=True, exist_ok=True)
    source = rootfs.parent / "pause.c"
    source.write_text(PAUSE_C)
    subprocess.run(
        ["gcc", "-static", "-O2", "-o", str(rootfs / "pause"), str(source)],
        check=True,
        capture_output=True,
    )
    source.unlink()
    return rootfs


def build_image(
    directory: Path, rootfs: Path, names: list[str], config: dict[str, object]
) -> Image:
    """Write the OCI archive of ``rootfs`` under ``directory``; the image to import."""
    archive = directory / (hashlib.sha256("\n".join(names).encode()).hexdigest()[:16] + ".tar")
    archive.write_bytes(oci_archive(rootfs, names, config))
    return Image(tuple(names), archive)


def make_images(directory: Path) -> list[Image]:
    """The pause image (PAUSE_IMAGE) and the busybox test image (BUSYBOX_IMAGE)."""
    pause = pause_image_rootfs(directory / "pause" / "rootfs")
    busybox = busybox_image_rootfs(directory / "busybox" / "rootfs")
    return [
        build_image(directory, pause, [PAUSE_IMAGE], {"Entrypoint": ["/pause"]}),
        build_image(directory, busybox, [BUSYBOX_IMAGE], {"Cmd": ["sh"]}),
    ]


# ---- the daemon ------------------------------------------------------------------------------


def write_cni_config(directory: Path, ipam_dir: Path) -> Path:
    """The one CNI network: a bridge of our own, no masquerade (traffic stays on the bridge)."""
    directory.mkdir(parents=True, exist_ok=True)
    conflist = {
        "cniVersion": "1.0.0",
        "name": CNI_NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": CNI_BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": CNI_SUBNET}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(ipam_dir),
                },
            }
        ],
    }
    path = directory / f"10-{CNI_NETWORK}.conflist"
    path.write_text(json.dumps(conflist, indent=2))
    return path


def write_config(base: Path, handlers: dict[str, str], sandbox_image: str = PAUSE_IMAGE) -> Path:
    """containerd's config.toml: root, state, socket, opt and CNI config under ``base``; the CRI
    plugin with one runc v2 runtime per entry of ``handlers`` (name → OCI runtime binary), each
    with its own --root under ``base``."""
    cri = '[plugins."io.containerd.grpc.v1.cri"]'
    runtimes = ""
    for name, binary in handlers.items():
        runtimes += (
            f"[{cri[1:-1]}.containerd.runtimes.{name}]\n"
            f'  runtime_type = "io.containerd.runc.v2"\n'
            f"[{cri[1:-1]}.containerd.runtimes.{name}.options]\n"
            f'  BinaryName = "{binary}"\n'
            f'  Root = "{base}/runtime-{name}"\n'
        )
    config = base / "config.toml"
    config.write_text(
        f"version = 2\n"
        f'root = "{base}/root"\n'
        f'state = "{base}/state"\n'
        f"[grpc]\n"
        f'  address = "{base}/containerd.sock"\n'
        f'[plugins."io.containerd.internal.v1.opt"]\n'
        f'  path = "{base}/opt"\n'
        f"{cri}\n"
        f'  sandbox_image = "{sandbox_image}"\n'
        # Without CAP_SYS_RESOURCE (this machine) runc fails every sandbox otherwise.
        f"  restrict_oom_score_adj = true\n"
        f'  stream_server_address = "127.0.0.1"\n'
        f'  stream_server_port = "0"\n'
        # Netns files under our state dir, not /var/run/netns: nothing shared with the host's.
        f"  netns_mounts_under_state_dir = true\n"
        f"[{cri[1:-1]}.containerd]\n"
        f'  snapshotter = "overlayfs"\n'
        f'  default_runtime_name = "{next(iter(handlers))}"\n'
        f"{runtimes}"
        f"[{cri[1:-1]}.cni]\n"
        f'  bin_dir = "{CNI_BIN_DIR}"\n'
        f'  conf_dir = "{base}/cni"\n'
        f"  max_conf_num = 1\n"
    )
    write_cni_config(base / "cni", base / "cni-ipam")
    return config


def handler_binaries() -> dict[str, str]:
    """The runtime handlers: runc, and the `bonneville` on PATH (docs/docker.md)."""
    return {
        "runc": shutil.which("runc") or "runc",
        "bonneville": shutil.which("bonneville") or "bonneville",
    }


@dataclass
class Containerd:
    """A running private containerd with the CRI plugin."""

    base: Path
    daemon: subprocess.Popen[bytes]

    @property
    def socket(self) -> Path:
        return self.base / "containerd.sock"

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    def ctr(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["ctr", "--address", str(self.socket), "--namespace", NAMESPACE, *args],
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=300,
            check=False,
        )

    def import_image(self, image: Image) -> None:
        result = self.ctr("images", "import", "-", input=image.archive.read_bytes())
        assert result.returncode == 0, result.stderr.decode()

    def others(self) -> list[str]:
        """Live processes under our base directory other than containerd itself: shims,
        runtimes, monitors, VMs."""
        return [
            p for p in leftover_processes(str(self.base)) if int(p.split(":")[0]) != self.daemon.pid
        ]

    def netns_files(self) -> list[str]:
        netns = self.base / "state" / "netns"
        return sorted(os.listdir(netns)) if netns.is_dir() else []

    def mounts(self) -> list[str]:
        """Mount points under the daemon's root and state (not the base's own tmpfs, if any)."""
        found = []
        for line in Path("/proc/self/mounts").read_text().splitlines():
            target = line.split()[1]
            if target.startswith((f"{self.base}/root", f"{self.base}/state")):
                found.append(target)
        return found


def bridge_ports() -> list[str]:
    """Links enslaved to our CNI bridge (each pod's host-side veth)."""
    shown = subprocess.run(
        ["ip", "-j", "link", "show", "master", CNI_BRIDGE], capture_output=True, check=False
    )
    if shown.returncode != 0 or not shown.stdout.strip():
        return []
    return sorted(link["ifname"] for link in json.loads(shown.stdout))


def remove_network_leftovers() -> None:
    """Our bridge and libcni's cached results for our network (a run killed part-way)."""
    subprocess.run(["ip", "link", "del", CNI_BRIDGE], capture_output=True, check=False)
    if CNI_CACHE.is_dir():
        for entry in CNI_CACHE.iterdir():
            if entry.name.startswith(f"{CNI_NETWORK}-"):
                entry.unlink(missing_ok=True)


def _force_remove_all(daemon: Containerd) -> None:
    """What a test left (it failed part-way): every task killed and deleted, every container
    deleted. CRI-level removal is the tests' business; this is the last resort."""
    listed = daemon.ctr("containers", "ls", "-q").stdout.decode().split()
    for cid in listed:
        daemon.ctr("tasks", "kill", "-s", "KILL", cid)
    for cid in listed:
        daemon.ctr("tasks", "delete", "-f", cid)
        daemon.ctr("containers", "delete", cid)


@contextlib.contextmanager
def private_containerd(
    images: list[Image], handlers: dict[str, str] | None = None
) -> Iterator[Containerd]:
    """A containerd of our own (root, state, socket, CNI config under /tmp) with the CRI plugin,
    the runtime ``handlers`` (default: handler_binaries()) and ``images`` imported; afterwards
    the daemon, its shims, the bridge and everything it mounted are gone. The CNI bridge
    forwards whatever the host's FORWARD policy is (forwarding_accepted)."""
    with forwarding_accepted(CNI_BRIDGE), _private_containerd(images, handlers) as daemon:
        yield daemon


@contextlib.contextmanager
def _private_containerd(
    images: list[Image], handlers: dict[str, str] | None
) -> Iterator[Containerd]:
    lock = open(LOCK, "w")  # noqa: SIM115
    fcntl.flock(lock, fcntl.LOCK_EX)
    # Short paths: the shims put unix sockets under the state dir.
    base = Path(tempfile.mkdtemp(prefix="bvcri-", dir="/tmp"))
    remove_network_leftovers()
    config = write_config(base, handlers or handler_binaries())
    log = open(base / "containerd.log", "wb")  # noqa: SIM115
    daemon = subprocess.Popen(
        ["containerd", "--config", str(config)],
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )
    running = Containerd(base, daemon)
    try:
        deadline = time.monotonic() + 60
        while running.ctr("version").returncode != 0:
            assert daemon.poll() is None, (base / "containerd.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "containerd did not come up"
            time.sleep(0.2)
        for image in images:
            running.import_image(image)
        yield running
    finally:
        _force_remove_all(running)
        stop_daemon(daemon, base)
        log.close()
        # The shims outlive their daemon by design; these are the private daemon's own.
        for line in leftover_processes(str(base)):
            pid, _, command = line.partition(": ")
            if "containerd-shim" in command:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)
        remove_network_leftovers()
        lock.close()
    assert leftover_processes(str(base)) == []


# ---- the CRI client --------------------------------------------------------------------------

# CRI v1 NamespaceMode values (api.proto): kubelet sets CONTAINER for a pod without
# shareProcessNamespace; the zero value, POD, shares the sandbox's.
POD, CONTAINER, NODE = 0, 1, 2
EXITED = 2  # ContainerState.CONTAINER_EXITED
CALL_TIMEOUT = 600.0  # seconds for one RPC: a create or start under TCG boots a VM


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes


@dataclass(frozen=True)
class Forwarded:
    """What one port-forwarded connection carried back: the server's bytes, and the text
    containerd put on the port's error channel (empty when the forwarding itself worked)."""

    data: bytes
    error: bytes


@dataclass(frozen=True)
class LogLine:
    """One line of a CRI log file: `<RFC 3339 time> <stdout|stderr> <F|P> <text>`."""

    time: str
    stream: str
    partial: bool
    text: str


def read_log(path: str | Path) -> list[LogLine]:
    lines = []
    for raw in Path(path).read_text(errors="replace").splitlines():
        stamp, stream, tag, text = [*raw.split(" ", 3), "", "", ""][:4]
        lines.append(LogLine(stamp, stream, tag == "P", text))
    return lines


def log_text(path: str | Path, stream: str = "stdout") -> str:
    """The text a container wrote to ``stream``, partial lines joined as kubelet joins them."""
    out = ""
    for line in read_log(path):
        if line.stream == stream:
            out += line.text if line.partial else line.text + "\n"
    return out


def _exit_code_of(status: dict[str, Any]) -> int:
    """The exit code in the v4 channel protocol's final status (a metav1.Status)."""
    if status.get("status") == "Success":
        return 0
    for cause in status.get("details", {}).get("causes", []):
        if cause.get("reason") == "ExitCode":
            return int(cause["message"])
    raise AssertionError(f"exec failed: {status}")


class CriClient:
    """The CRI v1 RuntimeService and ImageService of one endpoint, typed."""

    def __init__(self, endpoint: str) -> None:
        import grpc
        from cri_api.v1 import api_pb2, api_pb2_grpc

        self.api = api_pb2
        self.channel: grpc.Channel = grpc.insecure_channel(endpoint)
        self.runtime = api_pb2_grpc.RuntimeServiceStub(self.channel)
        self.images = api_pb2_grpc.ImageServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def version(self) -> api_pb2.VersionResponse:
        return self.runtime.Version(self.api.VersionRequest(), timeout=CALL_TIMEOUT)

    # pods

    def run_pod_sandbox(self, config: api_pb2.PodSandboxConfig, handler: str) -> str:
        request = self.api.RunPodSandboxRequest(config=config, runtime_handler=handler)
        return str(self.runtime.RunPodSandbox(request, timeout=CALL_TIMEOUT).pod_sandbox_id)

    def stop_pod_sandbox(self, pod_id: str) -> None:
        request = self.api.StopPodSandboxRequest(pod_sandbox_id=pod_id)
        self.runtime.StopPodSandbox(request, timeout=CALL_TIMEOUT)

    def remove_pod_sandbox(self, pod_id: str) -> None:
        request = self.api.RemovePodSandboxRequest(pod_sandbox_id=pod_id)
        self.runtime.RemovePodSandbox(request, timeout=CALL_TIMEOUT)

    def pod_sandbox_status(self, pod_id: str) -> api_pb2.PodSandboxStatus:
        request = self.api.PodSandboxStatusRequest(pod_sandbox_id=pod_id)
        return self.runtime.PodSandboxStatus(request, timeout=CALL_TIMEOUT).status

    def list_pod_sandbox(self) -> list[api_pb2.PodSandbox]:
        response = self.runtime.ListPodSandbox(self.api.ListPodSandboxRequest(), timeout=60)
        return list(response.items)

    # containers

    def create_container(
        self, pod_id: str, config: api_pb2.ContainerConfig, sandbox: api_pb2.PodSandboxConfig
    ) -> str:
        request = self.api.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config, sandbox_config=sandbox
        )
        return str(self.runtime.CreateContainer(request, timeout=CALL_TIMEOUT).container_id)

    def start_container(self, container_id: str) -> None:
        request = self.api.StartContainerRequest(container_id=container_id)
        self.runtime.StartContainer(request, timeout=CALL_TIMEOUT)

    def stop_container(self, container_id: str, timeout: int = 30) -> None:
        request = self.api.StopContainerRequest(container_id=container_id, timeout=timeout)
        self.runtime.StopContainer(request, timeout=CALL_TIMEOUT + timeout)

    def remove_container(self, container_id: str) -> None:
        request = self.api.RemoveContainerRequest(container_id=container_id)
        self.runtime.RemoveContainer(request, timeout=CALL_TIMEOUT)

    def container_status(self, container_id: str) -> api_pb2.ContainerStatus:
        request = self.api.ContainerStatusRequest(container_id=container_id)
        return self.runtime.ContainerStatus(request, timeout=CALL_TIMEOUT).status

    def list_containers(self, pod_id: str | None = None) -> list[api_pb2.Container]:
        wanted = self.api.ContainerFilter(pod_sandbox_id=pod_id or "")
        request = self.api.ListContainersRequest(filter=wanted)
        return list(self.runtime.ListContainers(request, timeout=60).containers)

    def wait_exited(self, container_id: str, timeout: float = 300) -> api_pb2.ContainerStatus:
        """The container's status once it has exited (polled: CRI has no wait call)."""
        deadline = time.monotonic() + timeout
        while (status := self.container_status(container_id)).state != EXITED:
            assert time.monotonic() < deadline, f"{container_id} still {status.state}"
            time.sleep(0.5)
        return status

    # processes in containers

    def exec_sync(self, container_id: str, cmd: list[str], timeout: int = 300) -> ExecResult:
        request = self.api.ExecSyncRequest(container_id=container_id, cmd=cmd, timeout=timeout)
        response = self.runtime.ExecSync(request, timeout=timeout + CALL_TIMEOUT)
        return ExecResult(response.exit_code, response.stdout, response.stderr)

    def exec(
        self, container_id: str, cmd: list[str], stdin: bytes | None = None, timeout: float = 300
    ) -> ExecResult:
        """A streaming exec: the Exec RPC gives a URL of containerd's streaming server, spoken
        to over a websocket with the `v4.channel.k8s.io` subprotocol (kubelet's own
        remotecommand; containerd 1.6 takes it as well as SPDY). Each binary message is one
        channel byte (0 stdin, 1 stdout, 2 stderr, 3 status) and its data; v4 has no stdin
        close, so ``stdin`` suits commands that read a known amount."""
        import websocket

        request = self.api.ExecRequest(
            container_id=container_id, cmd=cmd, stdin=stdin is not None, stdout=True, stderr=True
        )
        url = self.runtime.Exec(request, timeout=CALL_TIMEOUT).url
        assert url.startswith("http://"), url
        ws = websocket.create_connection(
            "ws://" + url.removeprefix("http://"),
            subprotocols=["v4.channel.k8s.io"],
            timeout=timeout,
        )
        try:
            assert ws.getsubprotocol() == "v4.channel.k8s.io", ws.getsubprotocol()
            if stdin:
                ws.send_binary(b"\x00" + stdin)
            streams: dict[int, bytes] = {1: b"", 2: b"", 3: b""}
            while True:
                opcode, data = ws.recv_data()
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    break
                if data:
                    streams[data[0]] = streams.get(data[0], b"") + data[1:]
        except websocket.WebSocketConnectionClosedException:
            pass
        finally:
            ws.close()
        assert streams[3], "the exec ended without a status"
        return ExecResult(_exit_code_of(json.loads(streams[3])), streams[1], streams[2])

    def port_forward(self, pod_id: str, port: int, send: bytes, timeout: float = 120) -> Forwarded:
        """One TCP connection to ``port`` in the pod, as `kubectl port-forward` (`crictl
        port-forward`) makes it: the PortForward RPC gives a URL of containerd's streaming
        server, spoken to over a websocket with the `v4.channel.k8s.io` subprotocol (its
        port-forward handler takes that, its base64 variant or none; `portforward.k8s.io` is
        the SPDY upgrade's). The port's data channel is 0 and its error channel 1 (2n and
        2n+1 for the n-th port of a request); the server's first message on each is the port,
        2 bytes little-endian. containerd dials localhost:PORT in the pod's network namespace
        and relays until either side ends; ``send`` goes first, and the bytes come back until
        the server closes the websocket (v4 has no half-close: the pod's server must end the
        connection, as an HTTP/1.0 server does)."""
        import websocket

        request = self.api.PortForwardRequest(pod_sandbox_id=pod_id, port=[port])
        url = self.runtime.PortForward(request, timeout=CALL_TIMEOUT).url
        assert url.startswith("http://"), url
        ws = websocket.create_connection(
            "ws://" + url.removeprefix("http://"),
            subprotocols=["v4.channel.k8s.io"],
            timeout=timeout,
        )
        channels: dict[int, bytes] = {0: b"", 1: b""}
        try:
            assert ws.getsubprotocol() == "v4.channel.k8s.io", ws.getsubprotocol()
            if send:
                ws.send_binary(b"\x00" + send)
            while True:
                opcode, data = ws.recv_data()
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    break
                if data:
                    assert data[0] in channels, f"a frame on channel {data[0]}"
                    channels[data[0]] += data[1:]
        except (websocket.WebSocketConnectionClosedException, ConnectionError):
            pass  # the server closed the connection (it may not wait for our close frame)
        finally:
            ws.close()
        prefix = struct.pack("<H", port)
        for channel, received in channels.items():
            assert received.startswith(prefix), f"channel {channel} began {received[:2]!r}"
        return Forwarded(channels[0][2:], channels[1][2:])

    # configs as kubelet writes them

    def pod_config(
        self, name: str, log_directory: Path, pid: int = CONTAINER, network: int = POD
    ) -> api_pb2.PodSandboxConfig:
        """kubelet's sandbox config; ``network`` NODE for a hostNetwork pod."""
        api = self.api
        uid = uuid.uuid4().hex
        log_directory.mkdir(parents=True, exist_ok=True)
        return api.PodSandboxConfig(
            metadata=api.PodSandboxMetadata(name=name, uid=uid, namespace="bvtest", attempt=0),
            hostname="" if network == NODE else name,  # kubelet's: a hostNetwork pod has none
            log_directory=str(log_directory),
            labels={"bonneville-test": name},
            linux=api.LinuxPodSandboxConfig(
                security_context=api.LinuxSandboxSecurityContext(
                    namespace_options=api.NamespaceOption(network=network, pid=pid, ipc=POD)
                )
            ),
        )

    def container_config(
        self,
        name: str,
        command: list[str],
        sandbox: api_pb2.PodSandboxConfig,
        attempt: int = 0,
        memory_limit: int = 0,
        image: str = BUSYBOX_IMAGE,
    ) -> api_pb2.ContainerConfig:
        api = self.api
        # kubelet gives each container its pod's PID and network namespace modes.
        pid = sandbox.linux.security_context.namespace_options.pid
        network = sandbox.linux.security_context.namespace_options.network
        return api.ContainerConfig(
            metadata=api.ContainerMetadata(name=name, attempt=attempt),
            image=api.ImageSpec(image=image),
            command=command,
            log_path=f"{name}/{attempt}.log",  # kubelet's layout, under the pod's log dir
            linux=api.LinuxContainerConfig(
                resources=api.LinuxContainerResources(memory_limit_in_bytes=memory_limit),
                security_context=api.LinuxContainerSecurityContext(
                    namespace_options=api.NamespaceOption(network=network, pid=pid, ipc=POD)
                ),
            ),
        )


# ---- pytest fixtures -------------------------------------------------------------------------


@dataclass
class Pod:
    """A pod sandbox the test made, with its config (CreateContainer needs it)."""

    id: str
    config: api_pb2.PodSandboxConfig
    containers: list[str] = field(default_factory=list)


class Pods:
    """Pods and containers of one test on one runtime handler; all removed afterwards."""

    def __init__(self, client: CriClient, daemon: Containerd, handler: str, logs: Path) -> None:
        self.client = client
        self.daemon = daemon
        self.handler = handler
        self.logs = logs

    def pod(self, name: str, pid: int = CONTAINER, network: int = POD) -> Pod:
        config = self.client.pod_config(name, self.logs / name, pid=pid, network=network)
        return Pod(self.client.run_pod_sandbox(config, self.handler), config)

    def container(
        self,
        pod: Pod,
        name: str,
        command: list[str],
        *,
        attempt: int = 0,
        memory_limit: int = 0,
        start: bool = True,
    ) -> str:
        config = self.client.container_config(
            name, command, pod.config, attempt=attempt, memory_limit=memory_limit
        )
        cid = self.client.create_container(pod.id, config, pod.config)
        pod.containers.append(cid)
        if start:
            self.client.start_container(cid)
        return cid

    def log_path(self, container_id: str) -> str:
        return str(self.client.container_status(container_id).log_path)

    def remove_all(self) -> None:
        """Every pod of the daemon stopped and removed, as kubelet removes a deleted pod."""
        for sandbox in self.client.list_pod_sandbox():
            self.client.stop_pod_sandbox(sandbox.id)
            self.client.remove_pod_sandbox(sandbox.id)

    def leftovers(self) -> dict[str, list[str]]:
        return {
            "processes": self.daemon.others(),
            "links": host_links_of_ours(),
            "bridge ports": bridge_ports(),
            "netns files": self.daemon.netns_files(),
            "mounts": self.daemon.mounts(),
            "containers": self.daemon.ctr("containers", "ls", "-q").stdout.decode().split(),
        }


def wait_until_clean(pods: Pods, timeout: float = 120) -> dict[str, list[str]]:
    """What is still left once nothing more goes (shims and VMs take a moment to exit)."""
    deadline = time.monotonic() + timeout
    while any((left := pods.leftovers()).values()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return {k: v for k, v in left.items() if v}


@pytest.fixture(scope="session", name="cri_images")
def cri_images_fixture(tmp_path_factory: pytest.TempPathFactory) -> list[Image]:
    """The pause and busybox images, built once per session."""
    return make_images(tmp_path_factory.mktemp("cri-images"))


@pytest.fixture(scope="module", name="cri_containerd")
def cri_containerd_fixture(cri_images: list[Image]) -> Iterator[Containerd]:
    with private_containerd(cri_images) as daemon:
        yield daemon


@pytest.fixture(scope="module", name="cri_client")
def cri_client_fixture(cri_containerd: Containerd) -> Iterator[CriClient]:
    client = CriClient(cri_containerd.endpoint)
    yield client
    client.close()


@pytest.fixture(params=HANDLERS, name="pods")
def pods_fixture(
    request: pytest.FixtureRequest, cri_client: CriClient, cri_containerd: Containerd
) -> Iterator[Pods]:
    """The test's pods on one runtime handler; afterwards each is removed and nothing of it is
    left: no process under containerd's directory, no link of ours, no netns, no mount."""
    logs = cri_containerd.base / "pods" / uuid.uuid4().hex
    made = Pods(cri_client, cri_containerd, str(request.param), logs)
    yield made
    made.remove_all()
    assert wait_until_clean(made) == {}
    shutil.rmtree(logs, ignore_errors=True)


def poll(condition: Callable[[], bool], timeout: float = 300, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} never held"
        time.sleep(0.5)

"""Kubernetes pods through containerd's CRI plugin, on the runc and bonneville handlers.

Each case runs once per runtime handler (the `pods` fixture): runc shows the case itself is
right; bonneville is held to the same answers, except where a VM must differ (its kernel).
The daemon, images, CNI network and client are in integration/cri.py.
"""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import pytest

from integration.cri import (
    CNI_BIN_DIR,
    NODE,
    POD,
    CriClient,
    Forwarded,
    Pods,
    cri_client_fixture,
    cri_containerd_fixture,
    cri_images_fixture,
    log_text,
    pods_fixture,
    poll,
)

# The fixtures live beside the helpers: imported, pytest finds them here.
FIXTURES = [cri_images_fixture, cri_containerd_fixture, cri_client_fixture, pods_fixture]

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(shutil.which("containerd") is None, reason="containerd is not installed"),
    pytest.mark.skipif(
        not Path(CNI_BIN_DIR, "bridge").exists(), reason="containernetworking-plugins missing"
    ),
]

# A container that runs until stopped, and says so in its log when it is.
SERVE = ["sh", "-c", "trap 'echo stopping; exit 0' TERM; echo started; while :; do sleep 1; done"]
MiB = 1024 * 1024


def host_boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def started(client: CriClient, cid: str, text: str = "started") -> None:
    """Wait until the container has written ``text`` to its log."""
    path = client.container_status(cid).log_path
    poll(lambda: Path(path).exists() and text in log_text(path), what=f"{text!r} in {path}")


def test_containers_of_a_pod_reach_each_other_over_localhost(pods: Pods) -> None:
    pod = pods.pod("web")
    server = (
        "mkdir -p /tmp/www && echo hello-from-server >/tmp/www/index.html"
        " && exec httpd -f -p 8080 -h /tmp/www"
    )
    pods.container(pod, "server", ["sh", "-c", server])
    # The client retries: the server may not listen yet when it starts.
    client = (
        "for i in $(seq 1 120); do wget -q -O - http://localhost:8080/ && exit 0; sleep 1; done;"
        " exit 1"
    )
    cid = pods.container(pod, "client", ["sh", "-c", client])
    status = pods.client.wait_exited(cid)
    assert status.exit_code == 0, log_text(status.log_path, "stderr")
    assert log_text(status.log_path) == "hello-from-server\n"


def test_containers_of_a_pod_share_one_kernel(pods: Pods) -> None:
    pod = pods.pod("kernel")
    first = pods.container(pod, "first", SERVE)
    second = pods.container(pod, "second", SERVE)
    ids = []
    for cid in (first, second):
        result = pods.client.exec_sync(cid, ["cat", "/proc/sys/kernel/random/boot_id"])
        assert result.exit_code == 0, result.stderr
        ids.append(result.stdout.decode().strip())
    assert ids[0] == ids[1]
    if pods.handler == "runc":
        assert ids[0] == host_boot_id()
    else:
        assert ids[0] != host_boot_id()  # the pod's VM, not the host


def test_exec_logs_stop_and_remove(pods: Pods) -> None:
    client = pods.client
    pod = pods.pod("exec")
    cid = pods.container(pod, "app", SERVE)
    started(client, cid)

    streamed = client.exec(cid, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (streamed.exit_code, streamed.stdout, streamed.stderr) == (3, b"out\n", b"err\n")
    fed = client.exec(cid, ["head", "-c", "5"], stdin=b"hello")
    assert (fed.exit_code, fed.stdout) == (0, b"hello")

    synced = client.exec_sync(cid, ["sh", "-c", "echo sync; echo warn >&2; exit 4"])
    assert (synced.exit_code, synced.stdout, synced.stderr) == (4, b"sync\n", b"warn\n")

    client.stop_container(cid, timeout=60)
    status = client.container_status(cid)
    assert status.exit_code == 0  # the TERM trap ran
    assert log_text(status.log_path) == "started\nstopping\n"
    client.remove_container(cid)
    assert client.list_containers(pod.id) == []


def test_a_new_container_and_a_restarted_one_in_a_running_pod(pods: Pods) -> None:
    client = pods.client
    pod = pods.pod("restart")
    first = pods.container(pod, "first", SERVE)
    job = pods.container(pod, "job", ["sh", "-c", "echo attempt0; exit 1"])
    assert client.wait_exited(job).exit_code == 1

    # A container added to the pod after the first ones.
    late = pods.container(pod, "late", SERVE)
    started(client, late)
    assert client.exec_sync(late, ["echo", "late"]).stdout == b"late\n"

    # kubelet's restart: the exited attempt stays, attempt 1 is a new create in the same pod.
    again = pods.container(pod, "job", ["sh", "-c", "echo attempt1; exit 0"], attempt=1)
    status = client.wait_exited(again)
    assert (status.metadata.name, status.metadata.attempt) == ("job", 1)
    assert status.exit_code == 0
    assert log_text(status.log_path) == "attempt1\n"
    assert log_text(client.container_status(job).log_path) == "attempt0\n"
    assert client.container_status(first).state == 1  # CONTAINER_RUNNING
    assert len(client.list_containers(pod.id)) == 4


def test_a_shared_pid_namespace_shows_the_pause_process(pods: Pods) -> None:
    pod = pods.pod("shared-pid", pid=POD)
    cid = pods.container(pod, "app", SERVE)
    comm = pods.client.exec_sync(cid, ["cat", "/proc/1/comm"])
    assert (comm.exit_code, comm.stdout) == (0, b"pause\n"), comm.stderr
    listed = pods.client.exec_sync(cid, ["ps", "-o", "pid,comm"])
    assert listed.exit_code == 0, listed.stderr
    assert "pause" in listed.stdout.decode()
    assert "sleep" in listed.stdout.decode() or "sh" in listed.stdout.decode()


def test_a_container_uses_more_memory_than_a_default_vm(pods: Pods) -> None:
    pod = pods.pod("memory")
    # dd's one 500 MiB buffer, filled from /dev/zero: every page touched, within 768 MiB.
    command = ["sh", "-c", "dd if=/dev/zero of=/dev/null bs=500M count=1 && echo allocated"]
    cid = pods.container(pod, "big", command, memory_limit=768 * MiB)
    status = pods.client.wait_exited(cid)
    assert status.exit_code == 0, log_text(status.log_path, "stderr")
    assert log_text(status.log_path) == "allocated\n"


def test_a_container_over_its_memory_limit_is_oom_killed(pods: Pods) -> None:
    """critest's case: kubelet reads the exit as 137 with reason OOMKilled, which containerd
    sets only when the runtime's cgroup saw an OOM kill (under bonneville the guest's kernel
    killed it; the monitor has the host's kernel count one)."""
    pod = pods.pod("oom")
    command = ["sh", "-c", "dd if=/dev/zero of=/dev/null bs=20M"]
    cid = pods.container(pod, "hog", command, memory_limit=15 * MiB)
    status = pods.client.wait_exited(cid)
    assert (status.exit_code, status.reason) == (137, "OOMKilled"), status
    # A container that ends by itself is not reported so.
    fine = pods.container(pod, "fine", ["sh", "-c", "exit 3"], memory_limit=15 * MiB)
    status = pods.client.wait_exited(fine)
    assert (status.exit_code, status.reason) == (3, "Error"), status


def test_a_pod_removed_while_its_containers_run(pods: Pods) -> None:
    client = pods.client
    pod = pods.pod("removed")
    running = [pods.container(pod, name, SERVE) for name in ("one", "two")]
    for cid in running:
        started(client, cid)
    client.stop_pod_sandbox(pod.id)
    client.remove_pod_sandbox(pod.id)
    assert client.list_containers(pod.id) == []
    assert pod.id not in [sandbox.id for sandbox in client.list_pod_sandbox()]
    # (the fixture then checks that nothing of the pod is left on the host)


# ---- ports: CRI's port-forward, a hostNetwork pod's servers ----------------------------------

HTTP_GET = b"GET / HTTP/1.0\r\n\r\n"  # HTTP/1.0: the server ends the connection


def serve_http(port: int, body: str) -> list[str]:
    """A container command: busybox httpd serving ``body`` on ``port`` until TERM (httpd as
    PID 1 of its namespace would not die of it)."""
    script = (
        f"mkdir -p /tmp/www && echo {body} >/tmp/www/index.html"
        f" && httpd -f -p {port} -h /tmp/www & trap 'exit 0' TERM; wait"
    )
    return ["sh", "-c", script]


def forward_until_answered(client: CriClient, pod_id: str, port: int) -> Forwarded:
    """Port-forward until the pod's server answers (it may not listen yet; under bonneville its
    port is forwarded once the agent has seen the guest's socket)."""
    deadline = time.monotonic() + 300
    while not (answer := client.port_forward(pod_id, port, HTTP_GET)).data:
        assert time.monotonic() < deadline, f"port {port} never answered: {answer}"
        time.sleep(0.5)
    return answer


def test_port_forward_reaches_a_pods_server(pods: Pods) -> None:
    """`kubectl port-forward`: containerd dials localhost:PORT in the pod's network namespace,
    which under bonneville is the sandbox's monitor relaying to the pod VM's port."""
    client = pods.client
    pod = pods.pod("forward")
    server = pods.container(pod, "server", serve_http(8080, "hello-through-port-forward"))
    first = forward_until_answered(client, pod.id, 8080)
    assert first.error == b""
    assert first.data.startswith(b"HTTP/1.") and first.data.endswith(
        b"\r\n\r\nhello-through-port-forward\n"
    ), first
    # A second connection, the first one closed: the same answer, at once.
    second = client.port_forward(pod.id, 8080, HTTP_GET)
    assert (second.error, second.data.split(b"\r\n")[0]) == (b"", first.data.split(b"\r\n")[0])
    assert second.data.endswith(b"hello-through-port-forward\n"), second
    # A port nothing in the pod listens on: containerd's dial fails, as under runc.
    closed = client.port_forward(pod.id, 8081, HTTP_GET)
    assert closed.data == b"" and b"error forwarding port 8081" in closed.error, closed
    # The server gone, its port goes too.
    client.stop_container(server, timeout=60)
    deadline = time.monotonic() + 120
    while not (gone := client.port_forward(pod.id, 8080, HTTP_GET)).error:
        assert gone.data == b"", "the server answered after it was stopped"
        assert time.monotonic() < deadline, "port 8080 is still forwarded"
        time.sleep(0.5)
    assert b"error forwarding port 8080" in gone.error, gone


def free_port() -> int:
    """A port nothing on the host uses now (nothing else should take it meanwhile)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int) -> bytes:
    """What 127.0.0.1:``port`` on the host answers a GET; b"" if nothing listens there."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
            conn.sendall(HTTP_GET)
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
            return answer
    except ConnectionError:
        return b""


def test_a_host_network_pods_server_answers_on_the_hosts_loopback(pods: Pods) -> None:
    """hostNetwork: the pod has no network namespace of its own, its server's port is the
    host's (under bonneville published by the monitor as the guest opens it) and goes with it."""
    port = free_port()
    pod = pods.pod("hostnet", network=NODE)
    pods.container(pod, "server", serve_http(port, "hello-host-network"))
    deadline = time.monotonic() + 300
    while not (answer := http_get(port)):
        assert time.monotonic() < deadline, f"nothing answers on 127.0.0.1:{port}"
        time.sleep(0.5)
    assert answer.startswith(b"HTTP/1.") and answer.endswith(b"\r\n\r\nhello-host-network\n")
    pods.client.stop_pod_sandbox(pod.id)
    pods.client.remove_pod_sandbox(pod.id)
    deadline = time.monotonic() + 120
    while port_open(port):
        assert time.monotonic() < deadline, f"127.0.0.1:{port} is still open"
        time.sleep(0.5)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(10)
        return s.connect_ex(("127.0.0.1", port)) == 0

"""Kubernetes pods through containerd's CRI plugin, on the runc and bonneville handlers.

Each case runs once per runtime handler (the `pods` fixture): runc shows the case itself is
right; bonneville is held to the same answers, except where a VM must differ (its kernel).
The daemon, images, CNI network and client are in integration/cri.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from integration.cri import (
    CNI_BIN_DIR,
    POD,
    CriClient,
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

"""The pod model's host-side logic: which VM a container joins (shim/pod.py), how big a pod's VM
must grow (shim/monitor/sizing.py), and the control protocol's typed requests
(shim/control.py). The pods themselves run in integration/test_cri.py and test_docker.py."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bonneville.backends import procfs
from bonneville.shim.control import Op, Request
from bonneville.shim.monitor.sizing import Demand, demand, growth
from bonneville.shim.pod import place
from bonneville.shim.state import ContainerState, Store
from bonneville.spec.config import parse_spec
from bonneville.spec.defaults import default_spec
from bonneville.spec.errors import BonnevilleError


@pytest.fixture
def stand_in() -> Iterator[subprocess.Popen[bytes]]:
    """A live process standing in for a container's monitor."""
    proc = subprocess.Popen(["sleep", "1000"])
    yield proc
    proc.kill()
    proc.wait()


def _store_with(tmp_path: Path, monitor: int, sandbox: str = "", cid: str = "sb") -> Store:
    store = Store(str(tmp_path / "root"))
    store.create_dir(cid)
    st = ContainerState(
        id=cid,
        bundle="/b",
        rootfs="/b/rootfs",
        backend="qemu",
        pid=monitor,
        pid_start=procfs.start_time(monitor),
        created_done=True,
        sandbox=sandbox,
    )
    store.save(st)
    return store


def _spec(annotations: dict[str, str] | None = None, **paths: str) -> Any:
    raw = default_spec()
    raw["annotations"] = annotations or {}
    namespaces = raw["linux"]["namespaces"]
    for ns in namespaces:
        if ns["type"] in paths:
            ns["path"] = paths[ns["type"]]
    return parse_spec(raw)


def test_a_container_alone_makes_its_own_vm(tmp_path: Path) -> None:
    placement = place(Store(str(tmp_path)), _spec())
    assert placement.owner == ""
    assert placement.namespaces == {"pid": "new", "ipc": "new", "uts": "new"}


def test_cri_annotations_join_the_sandbox_and_its_namespaces(
    tmp_path: Path, stand_in: subprocess.Popen[bytes]
) -> None:
    store = _store_with(tmp_path, stand_in.pid)
    spec = _spec(
        {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "sb"},
        network="/var/run/netns/cni-x",
        ipc=f"/proc/{stand_in.pid}/ns/ipc",
        uts=f"/proc/{stand_in.pid}/ns/uts",
    )
    placement = place(store, spec)
    assert placement.owner == "sb"
    assert placement.namespaces == {"pid": "new", "ipc": "container:sb", "uts": "container:sb"}
    shared_pid = _spec(
        {"io.cri-o.x": "y", "io.kubernetes.cri-o.ContainerType": "container"}
        | {"io.kubernetes.cri-o.SandboxID": "sb"},
        pid=f"/proc/{stand_in.pid}/ns/pid",
    )
    assert place(store, shared_pid).namespaces["pid"] == "container:sb"


def test_a_sandbox_never_joins_and_a_missing_sandbox_is_refused(
    tmp_path: Path, stand_in: subprocess.Popen[bytes]
) -> None:
    store = _store_with(tmp_path, stand_in.pid)
    sandbox = _spec(
        {"io.kubernetes.cri.container-type": "sandbox"}, network=f"/proc/{stand_in.pid}/ns/net"
    )
    assert place(store, sandbox).owner == ""
    orphan = _spec(
        {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "gone"}
    )
    with pytest.raises(BonnevilleError, match="sandbox container gone does not exist"):
        place(store, orphan)


def test_a_network_path_of_ours_joins_its_pod_without_annotations(
    tmp_path: Path, stand_in: subprocess.Popen[bytes]
) -> None:
    """docker --network container:A: the path names A's monitor; a member of a pod leads to
    the pod's owner."""
    store = _store_with(tmp_path, stand_in.pid)
    assert place(store, _spec(network=f"/proc/{stand_in.pid}/ns/net")).owner == "sb"
    member = subprocess.Popen(["sleep", "1000"])
    try:
        st = ContainerState(
            id="m1",
            bundle="/b",
            rootfs="/b/rootfs",
            backend="qemu",
            pid=member.pid,
            pid_start=procfs.start_time(member.pid),
            created_done=True,
            sandbox="sb",
        )
        store.create_dir("m1")
        store.save(st)
        assert place(store, _spec(network=f"/proc/{member.pid}/ns/net")).owner == "sb"
    finally:
        member.kill()
        member.wait()
    # Another process's namespace is no container's: a VM of its own.
    stranger = subprocess.Popen(["unshare", "--net", "sleep", "1000"])
    try:
        netns = f"/proc/{stranger.pid}/ns/net"
        deadline = time.monotonic() + 10
        while os.stat(netns).st_ino == os.stat("/proc/self/ns/net").st_ino:  # not unshared yet
            assert time.monotonic() < deadline, "unshare --net never made its namespace"
            time.sleep(0.01)
        assert place(store, _spec(network=netns)).owner == ""
    finally:
        stranger.kill()
        stranger.wait()


def test_joining_only_a_non_network_namespace_is_refused(
    tmp_path: Path, stand_in: subprocess.Popen[bytes]
) -> None:
    store = _store_with(tmp_path, stand_in.pid)
    with pytest.raises(BonnevilleError, match="needs its network namespace too"):
        place(store, _spec(ipc=f"/proc/{stand_in.pid}/ns/ipc"))


def test_a_stopped_sandbox_cannot_be_joined(tmp_path: Path) -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    store = _store_with(tmp_path, proc.pid)
    spec = _spec(
        {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "sb"}
    )
    with pytest.raises(BonnevilleError, match="not running"):
        place(store, spec)


def test_demand_from_resources() -> None:
    assert demand({}) == Demand(0, 0)
    assert demand({"memory": {"limit": 768 << 20, "swap": 768 << 20}}) == Demand(768, 0)
    assert demand({"memory": {"limit": (100 << 20) + 1}}) == Demand(101, 0)
    assert demand({"memory": {"limit": -1}, "cpu": {"quota": 150000, "period": 100000}}) == (
        Demand(0, 2)
    )
    assert demand({"cpu": {"quota": 50000}}) == Demand(0, 1)


def test_growth_holds_the_sandbox_plus_every_member() -> None:
    base = Demand(256, 1)
    # Room left: nothing to add.
    assert growth(base, [Demand(0, 0)], 256, 1, 2).add_memory_mib == 0
    # 256 + 768 = 1024 in a 256 MiB VM: 768 more, in 128 MiB blocks.
    assert growth(base, [Demand(768, 0)], 256, 1, 2).add_memory_mib == 768
    assert growth(base, [Demand(100, 0)], 256, 1, 2).add_memory_mib == 128
    # Already grown for an earlier member: only what is missing.
    assert growth(base, [Demand(512, 0), Demand(512, 0)], 768, 1, 2).add_memory_mib == 512
    # vCPUs up to the host's, never fewer than the VM has.
    assert growth(base, [Demand(0, 4)], 256, 1, 2).vcpus == 2
    assert growth(base, [], 256, 2, 2).vcpus == 2


def test_control_requests_round_trip_and_bad_ones_are_refused() -> None:
    import json

    request = Request(Op.SIGNAL, container="c2", signal=9, all=True)
    assert Request.decode(json.loads(request.encode())) == request
    assert Request.decode({"op": "start"}) == Request(Op.START)
    for bad, why in [
        ([], "not a JSON object"),
        ({"op": "frobnicate"}, "unknown request"),
        ({"op": "signal", "signal": "KILL"}, "signal number"),
        ({"op": "signal", "signal": True}, "signal number"),
        ({"op": "start", "container": 5}, "container must be a string"),
        ({"op": "exec", "process": [1]}, "process must be a JSON object"),
    ]:
        with pytest.raises(BonnevilleError, match=why):
            Request.decode(bad)

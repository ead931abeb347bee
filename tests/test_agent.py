"""The guest agent in host mode (as the fake backend runs it), driven over a socketpair.

Each test starts `python -m bonneville.guest.agent --fd N --root SHARE`, where SHARE holds one
busybox tree per container, named by its id (docs/protocol.md, "The pod model"), speaks
protocol version 2 to it with bonneville.guest.protocol, and kills it (and everything it
started) at the end. Needs root: the agent mounts and makes namespaces. Host mode has no
cgroups (guest/mode.py: Mode.cgroups), so limits, statistics and pause are only checked to be
refused here; they are tested against real VMs in integration/.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bonneville.backends import procfs
from bonneville.guest import protocol
from bonneville.guest.mounts import parse_mount_options
from bonneville.guest.paths import resolve_in_root
from bonneville.guest.proc import descendants
from bonneville.spec.defaults import default_spec
from tests.support import modules_imported_by

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the agent mounts: needs root")

Frame = tuple[int, int, bytes]
DEFAULT_CAPS_MASK = "0000000020000420"  # CAP_KILL | CAP_NET_BIND_SERVICE | CAP_AUDIT_WRITE
C1 = "c1"  # the pod's first container; its init is stream 1, as the monitor numbers it
INIT = protocol.INIT_STREAM
IDLE = ["sleep", "1000"]  # an init that keeps its container running


@dataclass
class Result:
    status: int
    signal: int | None
    stdout: bytes
    stderr: bytes
    eofs: set[int] = field(default_factory=set)


class Client:
    """The host end, as small as the tests need; frames other than replies are kept in order."""

    def __init__(
        self, sock: socket.socket, proc: subprocess.Popen[bytes], share: Path, template: Path
    ) -> None:
        self.sock = sock
        self.proc = proc
        self.share = share
        self.template = template  # the busybox root each container's tree is copied from
        self.decoder = protocol.Decoder()
        self.frames: list[Frame] = []
        self.replies: dict[int, dict[str, Any]] = {}
        self.next_req = 1
        self.eof = False
        # Pids the agent reported, checked gone at the end (only when they are the host's).
        self.host_pids = True
        self.pids: list[int] = []

    def send(self, frame: bytes) -> None:
        self.sock.sendall(frame)

    def add_tree(self, container: str) -> Path:
        """Container ``container``'s tree in the share, as the host places it before
        ``create``: ``root/``, a copy of the busybox root (made once)."""
        tree = self.share / container / "root"
        if not tree.exists():
            shutil.copytree(self.template, tree, symlinks=True)
        return tree

    def pump(self, timeout: float) -> None:
        readable, _, _ = select.select([self.sock], [], [], max(timeout, 0))
        if not readable:
            return
        data = self.sock.recv(1 << 20)
        if not data:
            self.eof = True
            return
        for ftype, stream, payload in self.decoder.feed(data):
            if ftype == protocol.CONTROL:
                message = protocol.decode_control(payload)
                if message["op"] == "reply":
                    self.replies[message["req"]] = message
                    continue
            self.frames.append((ftype, stream, payload))

    def wait_for(self, predicate: Callable[[], bool], what: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.eof:
                raise AssertionError(f"the agent closed the channel while waiting for {what}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {what}")
            self.pump(min(remaining, 0.05))  # short: some predicates look at /proc, not us

    def call(self, op: str, timeout: float = 10, **fields: Any) -> dict[str, Any]:
        req = self.next_req
        self.next_req += 1
        self.send(protocol.encode_control({"op": op, "req": req, **fields}))
        self.wait_for(lambda: req in self.replies, f"the reply to {op}", timeout)
        return self.replies.pop(req)

    def _note(self, reply: dict[str, Any]) -> dict[str, Any]:
        if reply["ok"] and self.host_pids:
            self.pids.append(reply["pid"])
        return reply

    def create(
        self,
        container: str = C1,
        stream: int = INIT,
        init: dict[str, Any] | None = None,
        namespaces: dict[str, str] | None = None,
        **overrides: Any,
    ) -> dict[str, Any]:
        """The agent's ``create``, with the container's tree added to the share if missing."""
        self.add_tree(container)
        return self.call(
            "create",
            container=container,
            stream=stream,
            config=config(**overrides),
            namespaces=namespaces or {},
            process=init if init is not None else process(IDLE),
        )

    def start(self, container: str = C1) -> dict[str, Any]:
        return self._note(self.call("start", container=container))

    def launch(
        self,
        container: str = C1,
        stream: int = INIT,
        init: dict[str, Any] | None = None,
        namespaces: dict[str, str] | None = None,
        **overrides: Any,
    ) -> int:
        """Create and start a container; its init's pid."""
        created = self.create(container, stream, init, namespaces, **overrides)
        assert created["ok"], created
        started = self.start(container)
        assert started["ok"], started
        pid: int = started["pid"]
        return pid

    def exec(
        self, ident: int, proc: dict[str, Any], stdin: bool = False, container: str = C1
    ) -> dict[str, Any]:
        return self._note(
            self.call("exec", container=container, id=ident, process=proc, stdin=stdin)
        )

    def ps(self, container: str = C1) -> list[int]:
        reply = self.call("ps", container=container)
        assert reply["ok"], reply
        pids: list[int] = reply["pids"]
        return pids

    def stdin(self, ident: int, data: bytes) -> None:
        for frame in protocol.encode_data(protocol.STDIN, ident, data):
            self.send(frame)

    def output(self, ident: int, ftype: int = protocol.STDOUT) -> bytes:
        return b"".join(p for t, s, p in self.frames if t == ftype and s == ident)

    def wait_output(self, ident: int, needle: bytes, timeout: float = 10) -> None:
        self.wait_for(lambda: needle in self.output(ident), f"{needle!r} from {ident}", timeout)

    def controls(self, op: str) -> list[dict[str, Any]]:
        return [
            m
            for t, _, p in self.frames
            if t == protocol.CONTROL and (m := protocol.decode_control(p))["op"] == op
        ]

    def exited(self, ident: int) -> bool:
        return any(m["id"] == ident for m in self.controls("exit"))

    def exit_order(self) -> list[int]:
        """The ids of the ``exit`` messages received so far, in their order."""
        return [m["id"] for m in self.controls("exit")]

    def collect(self, ident: int, timeout: float = 10) -> Result:
        """Wait for process ``ident`` to exit; its output, checking the documented order."""
        self.wait_for(lambda: self.exited(ident), f"the exit of process {ident}", timeout)
        data: dict[int, list[bytes]] = {protocol.STDOUT: [], protocol.STDERR: []}
        eofs: set[int] = set()
        rest: list[Frame] = []
        result: Result | None = None
        for frame in self.frames:
            ftype, stream, payload = frame
            if ftype in data and stream == ident and result is None:
                assert ftype not in eofs, "data after the EOF frame"
                if payload:
                    data[ftype].append(payload)
                else:
                    eofs.add(ftype)
            elif ftype == protocol.CONTROL and result is None:
                message = protocol.decode_control(payload)
                if message["op"] == "exit" and message["id"] == ident:
                    result = Result(
                        message["status"],
                        message["signal"],
                        b"".join(data[protocol.STDOUT]),
                        b"".join(data[protocol.STDERR]),
                        set(eofs),
                    )
                else:
                    rest.append(frame)
            else:
                rest.append(frame)
        self.frames = rest
        assert result is not None
        return result

    def stop(self) -> None:
        """Kill the agent and every process below it; check none of them survived."""
        if self.proc.poll() is None:
            procfs.kill_tree(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.sock.close()
        deadline = time.monotonic() + 5
        while any(procfs.is_alive(pid, None) for pid in self.pids):
            assert time.monotonic() < deadline, f"container processes left: {self.pids}"
            time.sleep(0.01)


@pytest.fixture
def share(tmp_path: Path) -> Path:
    """The pod's share (--root): one directory per container (Client.add_tree)."""
    path = tmp_path / "share"
    path.mkdir()
    return path


@pytest.fixture
def start_agent(
    tmp_path: Path, share: Path, busybox_rootfs: Path
) -> Iterator[Callable[..., Client]]:
    clients: list[Client] = []

    def start(prefix: tuple[str, ...] = (), args: tuple[str, ...] = ()) -> Client:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with open(tmp_path / "agent.log", "ab") as log:
            proc = subprocess.Popen(
                [
                    *prefix,
                    sys.executable,
                    "-m",
                    "bonneville.guest.agent",
                    "--fd",
                    str(theirs.fileno()),
                    "--root",
                    str(share),
                    *args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(theirs.fileno(),),
                close_fds=True,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": ":".join(sys.path)},
                start_new_session=True,
                preexec_fn=default_signals,
            )
        theirs.close()
        client = Client(ours, proc, share, busybox_rootfs)
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.stop()


def default_signals() -> None:
    """In the agent's child before exec: every signal at its default, none blocked, as PID 1
    of a VM starts (a test run from `nohup` or a shell's background job ignores some, and
    that would be the containers' inheritance, not the agent's doing)."""
    for number in signal.valid_signals():
        if number not in (signal.SIGKILL, signal.SIGSTOP):
            try:
                signal.signal(number, signal.SIG_DFL)
            except (OSError, ValueError):
                pass  # signals that cannot be caught
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def config(**overrides: Any) -> dict[str, Any]:
    """The `create.config` the monitor derives from the default config.json."""
    spec = default_spec()
    value: dict[str, Any] = {
        "hostname": "bonnie",
        "domainname": "example.org",
        "readonly": False,
        "mounts": spec["mounts"],
        "maskedPaths": [*spec["linux"]["maskedPaths"], "/proc/no-such-file"],
        "readonlyPaths": spec["linux"]["readonlyPaths"],
        "sysctl": {},
    }
    value.update(overrides)
    return value


def process(args: list[str], **overrides: Any) -> dict[str, Any]:
    """The default config's `process`, without a terminal."""
    value: dict[str, Any] = default_spec()["process"]
    value["terminal"] = False
    value["args"] = args
    value.update(overrides)
    return value


def greeted(start_agent: Callable[..., Client]) -> Client:
    client = start_agent()
    assert client.call("hello", version=protocol.VERSION)["ok"]
    return client


def ready(start_agent: Callable[..., Client], **overrides: Any) -> Client:
    """An agent with container c1 running (its init idles)."""
    client = greeted(start_agent)
    client.launch(C1, **overrides)
    return client


def run(
    client: Client, args: list[str], ident: int = 2, container: str = C1, **overrides: Any
) -> Result:
    reply = client.exec(ident, process(args, **overrides), container=container)
    assert reply["ok"], reply
    return client.collect(ident)


def agent_children(client: Client) -> list[int]:
    """The agent's processes (prepared or running) and theirs."""
    return descendants(client.proc.pid)


def wait_gone(pids: list[int], what: str, timeout: float = 10) -> None:
    """Poll until none of ``pids`` runs (a SIGKILLed process takes a moment to go)."""
    deadline = time.monotonic() + timeout
    while any(procfs.is_alive(pid, None) for pid in pids):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)  # polling interval


def ns_of(pid: int, kind: str) -> str:
    """The namespace of ``kind`` process ``pid`` is in, as /proc shows it ("ipc:[4026…]")."""
    return os.readlink(f"/proc/{pid}/ns/{kind}")


# --- the connection ---------------------------------------------------------------------------


def test_hello_reports_the_version_and_refuses_another(start_agent: Callable[..., Client]) -> None:
    client = start_agent()
    entropy = base64.b64encode(os.urandom(64)).decode()
    reply = client.call("hello", version=protocol.VERSION, time=time.time(), entropy=entropy)
    assert reply["ok"] and reply["version"] == protocol.VERSION
    assert reply["pid"] == client.proc.pid
    assert reply["kernel"] == os.uname().release
    refused = client.call("hello", version=1)
    assert not refused["ok"] and "version" in refused["error"]
    assert not client.call("frobnicate")["ok"]
    for op, fields in (
        ("exec", {"id": 2, "process": process(["true"]), "stdin": False}),
        ("start", {}),
        ("ps", {}),
        ("signal", {"signal": signal.SIGKILL}),
        ("remove", {}),
    ):
        early = client.call(op, container=C1, **fields)
        assert (early["ok"], early["error"]) == (False, "container 'c1' does not exist"), op


def test_malformed_control_frame_is_logged_and_serving_continues(
    start_agent: Callable[..., Client],
) -> None:
    client = start_agent()
    client.send(protocol.encode(protocol.CONTROL, 0, b"{not json"))
    client.send(protocol.encode(protocol.CONTROL, 0, json.dumps([1, 2]).encode()))
    assert client.call("hello", version=protocol.VERSION)["ok"]
    errors = [m["msg"] for m in client.controls("log") if m["level"] == "error"]
    assert len(errors) == 2 and all("malformed" in m for m in errors)


def test_broken_framing_closes_the_channel_cleanly(start_agent: Callable[..., Client]) -> None:
    client = ready(start_agent)
    assert client.exec(2, process(["sleep", "100"]))["ok"]
    client.send(b"\x09\x00\x00\x00\x00\x00\x00\x00")  # frame type 9 does not exist
    client.wait_for(lambda: client.eof, "the agent to close")
    assert any("protocol error" in m["msg"] for m in client.controls("log"))
    assert client.proc.wait(timeout=10) == 0
    wait_gone(client.pids, "the container processes' end")


def test_shutdown_replies_then_stops_everything(start_agent: Callable[..., Client]) -> None:
    client = ready(start_agent)
    assert client.exec(2, process(["sleep", "100"]))["ok"]
    assert len(client.pids) == 2  # the init and the exec'd sleep
    assert client.call("shutdown")["ok"]
    assert client.proc.wait(timeout=10) == 0
    wait_gone(client.pids, "the container processes' end")


# --- building a container -----------------------------------------------------------------------


def test_create_builds_proc_dev_devpts_and_masks(
    start_agent: Callable[..., Client], share: Path
) -> None:
    client = ready(start_agent)
    script = (
        "cat /proc/self/mounts; echo ---; ls -l /dev; echo ---; "
        "wc -c < /proc/keys; ls -A /proc/acpi | wc -l; "
        "touch /proc/acpi/x 2>/dev/null || echo acpi-ro; "
        "echo 1 > /proc/sys/kernel/ns_last_pid 2>/dev/null || echo sys-ro; "
        "echo discard > /dev/null && head -c 4 /dev/zero | wc -c"
    )
    result = run(client, ["sh", "-c", script])
    assert result.status == 0, result
    mounts, devices, checks = result.stdout.decode().split("---\n")
    table = {line.split()[1]: line.split() for line in mounts.splitlines()}
    assert table["/proc"][2] == "proc"
    assert table["/dev"][2] == "tmpfs" and "nosuid" in table["/dev"][3]
    assert table["/dev/pts"][2] == "devpts" and "ptmxmode=666" in table["/dev/pts"][3]
    assert table["/dev/shm"][2] == "tmpfs" and "noexec" in table["/dev/shm"][3]
    assert table["/dev/mqueue"][2] == "mqueue"
    assert table["/sys"][2] == "sysfs" and table["/sys"][3].startswith("ro")
    assert table["/proc/sys"][3].startswith("ro")
    assert table["/proc/acpi"][2] == "tmpfs"
    for name, numbers in (("null", "1,   3"), ("zero", "1,   5"), ("urandom", "1,   9")):
        assert re.search(rf"^crw-rw-rw- .*{numbers} .* {name}$", devices, re.M), devices
    assert re.search(r"ptmx -> pts/ptmx$", devices, re.M)
    assert re.search(r"fd -> /proc/self/fd$", devices, re.M)
    assert checks.split() == ["0", "0", "acpi-ro", "sys-ro", "4"]
    # All of it happened in the container's mount namespace: not in ours, nor the agent's.
    for pid in ("self", str(client.proc.pid)):
        with open(f"/proc/{pid}/mountinfo") as f:
            assert str(share) not in f.read(), pid


def test_create_failure_names_the_mount_and_leaves_nothing(
    start_agent: Callable[..., Client], share: Path
) -> None:
    client = greeted(start_agent)
    bad = {"destination": "/proc", "type": "nosuchfs", "source": "x", "options": []}
    good = config()["mounts"]
    reply = client.create(mounts=[good[1], bad])  # after a tmpfs /dev that did get mounted
    assert (reply["ok"], reply["error"]) == (False, "mount nosuchfs on /proc: no such device")
    # No process, no mount, no container: the id and the stream are free again.
    client.wait_for(lambda: not agent_children(client), "the failed init's end")
    with open(f"/proc/{client.proc.pid}/mountinfo") as f:
        assert str(share) not in f.read()
    assert client.call("ps", container=C1)["error"] == "container 'c1' does not exist"
    assert client.launch(C1)
    assert run(client, ["sh", "-c", "grep -c ' /proc proc ' /proc/self/mounts"]).stdout == b"1\n"


def test_readonly_root(start_agent: Callable[..., Client], share: Path) -> None:
    client = ready(start_agent, readonly=True)
    result = run(client, ["sh", "-c", "touch /x; touch /dev/shm/y && echo shm-ok"])
    assert b"Read-only file system" in result.stderr
    assert result.stdout == b"shm-ok\n"
    assert not (share / C1 / "root" / "x").exists()


def test_cgroup_requests_are_refused_in_host_mode(start_agent: Callable[..., Client]) -> None:
    """Host mode has no cgroups of its own (a host's are never the agent's to change): a
    container's limits are logged as not applied, and update/stats/pause say why they fail."""
    client = greeted(start_agent)
    assert client.create(resources={"pids.max": "20"})["ok"]
    assert any("limits not applied" in m["msg"] for m in client.controls("log"))
    assert client.start()["ok"]
    update = client.call("update", container=C1, resources={"pids.max": "10"})
    assert not update["ok"] and "host mode" in update["error"]
    for op in ("stats", "pause"):
        reply = client.call(op, container=C1)
        assert not reply["ok"] and "host mode" in reply["error"], op
    # The network is the pod's: configured once (nothing to do on a host).
    assert client.call("network", network={"interfaces": [], "routes": []})["ok"]
    again = client.call("network", network={"interfaces": [], "routes": []})
    assert not again["ok"] and "already" in again["error"]


# --- processes ---------------------------------------------------------------------------------


def test_exec_output_eof_frames_and_exit_status(start_agent: Callable[..., Client]) -> None:
    client = ready(start_agent)
    result = run(client, ["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (result.stdout, result.stderr) == (b"out\n", b"err\n")
    assert result.eofs == {protocol.STDOUT, protocol.STDERR}  # both before `exit`
    assert (result.status, result.signal) == (7, None)
    # Without stdin the process reads /dev/null.
    assert run(client, ["cat"], ident=3).stdout == b""


def test_stdin_round_trip_and_eof(start_agent: Callable[..., Client]) -> None:
    client = ready(start_agent)
    assert client.exec(2, process(["cat"]), stdin=True)["ok"]
    client.stdin(2, b"hello\n")
    client.wait_output(2, b"hello\n")  # echoed while stdin is still open
    client.stdin(2, b"x" * 300_000)  # more than a pipe holds: buffered, not blocking
    client.stdin(2, b"")
    result = client.collect(2)
    assert result.stdout == b"hello\n" + b"x" * 300_000
    assert result.status == 0


def test_signal_term_and_unknown_process(start_agent: Callable[..., Client]) -> None:
    client = ready(start_agent)
    assert client.exec(2, process(["sleep", "100"]))["ok"]
    assert client.call("signal", container=C1, id=2, signal=signal.SIGTERM, all=False)["ok"]
    result = client.collect(2)
    assert (result.status, result.signal) == (143, signal.SIGTERM)
    missing = client.call("signal", container=C1, id=9, signal=signal.SIGTERM, all=False)
    assert (missing["ok"], missing["error"]) == (False, "no such process")
    # A process of another container is not this one's to signal.
    client.launch("c2", stream=11)
    foreign = client.call("signal", container=C1, id=11, signal=signal.SIGKILL)
    assert (foreign["ok"], foreign["error"]) == (False, "no such process")
    assert not client.exited(11)


def test_signal_without_id_reaches_the_init_through_its_handler(
    start_agent: Callable[..., Client],
) -> None:
    """The init is PID 1 of its namespace: a signal reaches it through a handler of its own."""
    client = greeted(start_agent)
    script = "trap 'echo term; exit 5' TERM; echo ready; sleep 1000 & wait"
    client.launch(init=process(["sh", "-c", script]))
    client.wait_output(INIT, b"ready\n")
    assert client.call("signal", container=C1, signal=signal.SIGTERM)["ok"]
    result = client.collect(INIT)
    assert (result.status, result.stdout) == (5, b"ready\nterm\n")


def test_signal_all_ends_the_container_and_ps_lists_its_processes(
    start_agent: Callable[..., Client],
) -> None:
    client = greeted(start_agent)
    init = client.launch(init=process(["sh", "-c", "sleep 1000 & wait"]))
    client.wait_for(lambda: len(descendants(init)) == 1, "the background sleep")
    [background] = descendants(init)
    assert client.ps() == sorted([init, background])
    assert client.call("signal", container=C1, signal=signal.SIGKILL, all=True)["ok"]
    assert client.collect(INIT).status == 137
    assert not procfs.is_alive(background, None)
    assert client.ps() == []


def test_ps_and_signal_all_include_exec_processes(start_agent: Callable[..., Client]) -> None:
    """`ps` lists every process of the container and `signal` with `all` reaches each: the
    exec'd ones (children of the agent, not of the init) and theirs too."""
    client = ready(start_agent)
    [init] = client.pids
    first = client.exec(2, process(["sleep", "100"]))["pid"]
    second = client.exec(3, process(["sh", "-c", "sleep 100 & echo $!; wait"]))["pid"]
    client.wait_output(3, b"\n")
    client.wait_for(lambda: len(descendants(second)) == 1, "the background sleep")
    [grandchild] = descendants(second)
    pids = client.ps()
    assert {init, first, second, grandchild} <= set(pids), pids
    assert client.proc.pid not in pids
    # TERM: the exec'd processes end by it; the init, PID 1 of its namespace without a
    # handler, is left running.
    assert client.call("signal", container=C1, signal=signal.SIGTERM, all=True)["ok"]
    assert client.collect(2).status == 143
    assert client.collect(3).status == 143
    wait_gone([grandchild], "the grandchild's end")
    assert procfs.is_alive(init, None) and not client.exited(INIT)


def test_missing_binary_is_refused_with_runc_wording(start_agent: Callable[..., Client]) -> None:
    client = ready(start_agent)
    reply = client.exec(2, process(["no-such-binary"]))
    assert not reply["ok"]
    assert reply["error"] == 'exec: "no-such-binary": executable file not found in $PATH'
    reply = client.exec(3, process(["/bin/nope"]))
    assert reply["error"] == 'exec: "/bin/nope": stat /bin/nope: no such file or directory'
    # The id is free again and the agent still serves.
    assert run(client, ["true"]).status == 0
    assert client.exit_order() == []


def test_missing_cwd_is_refused(start_agent: Callable[..., Client]) -> None:
    client = ready(start_agent)
    reply = client.exec(2, process(["true"], cwd="/nonexistent"))
    assert not reply["ok"]
    assert reply["error"] == (
        'chdir to cwd ("/nonexistent") set in config.json failed: no such file or directory'
    )
    assert run(client, ["pwd"], cwd="/etc").stdout == b"/etc\n"


def test_user_groups_env_and_no_caps_for_non_root(start_agent: Callable[..., Client]) -> None:
    client = ready(start_agent)
    user = {"uid": 65534, "gid": 65534, "additionalGids": [5, 100]}
    script = "id -u; id -g; id -G; grep CapEff /proc/self/status"
    result = run(client, ["sh", "-c", script], user=user)
    lines = result.stdout.decode().splitlines()
    assert lines[0:2] == ["65534", "65534"]
    assert set(lines[2].split()) == {"65534", "5", "100"}
    assert lines[3].split() == ["CapEff:", "0000000000000000"]
    # The env is exactly the given one, plus HOME from /etc/passwd as runc adds it.
    result = run(client, ["env"], ident=3, user=user, env=["PATH=/bin", "FOO=bar baz"])
    assert result.stdout.decode().splitlines() == ["PATH=/bin", "FOO=bar baz", "HOME=/nonexistent"]


def test_default_capabilities_are_really_dropped(start_agent: Callable[..., Client]) -> None:
    client = ready(start_agent)
    script = (
        "grep -E '^(Cap|NoNewPrivs|Sig(Ign|Blk))' /proc/self/status; "
        "mount -t tmpfs t /tmp && echo mounted"
    )
    result = run(client, ["sh", "-c", script])
    status = dict(line.split(":\t") for line in result.stdout.decode().splitlines()[:8])
    for kind in ("CapEff", "CapPrm", "CapBnd"):
        assert status[kind] == DEFAULT_CAPS_MASK, status
    assert status["CapInh"] == status["CapAmb"] == "0000000000000000"
    assert status["NoNewPrivs"] == "1"
    # Nothing the agent (Python) ignores or blocks leaks into the container: SIGPIPE works.
    assert status["SigIgn"] == status["SigBlk"] == "0000000000000000"
    assert b"mounted" not in result.stdout and result.status != 0  # no CAP_SYS_ADMIN
    admin = ["CAP_SYS_ADMIN"]
    caps = {k: admin for k in ("bounding", "effective", "permitted", "inheritable", "ambient")}
    result = run(
        client,
        ["sh", "-c", "grep CapEff /proc/self/status; mount -t tmpfs t /tmp && echo mounted"],
        ident=3,
        capabilities=caps,
    )
    assert result.stdout.split() == [b"CapEff:", b"0000000000200000", b"mounted"]


def test_terminal_tty_and_resize(start_agent: Callable[..., Client]) -> None:
    """A terminal for the init (its pty comes from the container's build) and for an exec."""
    client = greeted(start_agent)
    script = "tty; stty size; read line; stty size; echo err >&2; sleep 1000"
    init = process(["sh", "-c", script], terminal=True, consoleSize={"height": 24, "width": 80})
    client.launch(init=init)
    client.wait_output(INIT, b"24 80\r\n")
    assert re.match(rb"/dev/pts/\d+\r\n", client.output(INIT)), client.output(INIT)
    assert client.call("resize", id=INIT, rows=50, cols=132)["ok"]
    client.stdin(INIT, b"go\n")
    client.wait_output(INIT, b"50 132\r\nerr\r\n")
    assert client.output(INIT, protocol.STDERR) == b""

    proc = process(
        ["sh", "-c", "tty; stty size; read line; stty size; echo err >&2"],
        terminal=True,
        consoleSize={"height": 30, "width": 90},
    )
    assert client.exec(2, proc, stdin=True)["ok"]
    client.wait_output(2, b"30 90\r\n")
    assert re.match(rb"/dev/pts/\d+\r\n", client.output(2)), client.output(2)
    assert client.call("resize", id=2, rows=40, cols=100)["ok"]
    client.stdin(2, b"go\n")
    result = client.collect(2)
    assert result.stdout.endswith(b"40 100\r\nerr\r\n")
    assert result.stderr == b"" and result.eofs == {protocol.STDOUT}
    assert result.status == 0
    assert not client.call("resize", id=2, rows=1, cols=1)["ok"]  # gone
    assert client.exec(3, process(IDLE))["ok"]
    no_tty = client.call("resize", id=3, rows=1, cols=1)
    assert (no_tty["ok"], no_tty["error"]) == (False, "process 3 has no terminal")


def test_rlimits_umask_oom_score_and_hostname(start_agent: Callable[..., Client]) -> None:
    client = ready(start_agent)
    rlimits = [{"type": "RLIMIT_NOFILE", "soft": 777, "hard": 888}]
    script = (
        "ulimit -n; ulimit -Hn; umask; cat /proc/self/oom_score_adj; "
        "hostname; cat /proc/sys/kernel/domainname"
    )
    result = run(
        client,
        ["sh", "-c", script],
        rlimits=rlimits,
        user={"uid": 0, "gid": 0, "umask": 0o077},
        oomScoreAdj=500,
    )
    assert result.stdout.decode().split() == [
        "777",
        "888",
        "0077",
        "500",
        "bonnie",
        "example.org",
    ]
    assert os.uname().nodename != "bonnie"  # the container's own UTS namespace
    assert run(client, ["sh", "-c", "umask"], ident=3).stdout == b"0022\n"
    bad = client.exec(4, process(["true"], rlimits=[{"type": "RLIMIT_BOGUS", "soft": 1}]))
    assert not bad["ok"] and "RLIMIT_BOGUS" in bad["error"]


def read_position(pid: int, name: str) -> int | None:
    """How far process ``pid`` has read the file ``name`` (its fdinfo ``pos``), None if it has
    not opened it (yet)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if os.readlink(f"/proc/{pid}/fd/{fd}").endswith(name):
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                return int(f.readline().split()[1])
    return None


def blocked_writing_a_pipe(pid: int) -> bool:
    """Process ``pid`` sleeps in the kernel waiting to write to a pipe (pipe_write,
    anon_pipe_write or pipe_wait_writable, as kernels name it)."""
    with open(f"/proc/{pid}/wchan") as f:
        wchan = f.read()
    return "pipe_write" in wchan or "pipe_wait_writable" in wchan


def test_large_output_arrives_intact_with_backpressure(
    start_agent: Callable[..., Client], share: Path
) -> None:
    client = ready(start_agent)
    data = os.urandom(5 << 20)
    (share / C1 / "root" / "big").write_bytes(data)
    pid = client.exec(2, process(["cat", "/big"]))["pid"]
    # While we do not read, the agent must stop reading cat once ~1 MiB waits for us: cat
    # stalls on its full pipe. Watching it stall means sampling; its pidfd ends the wait
    # early if cat finishes, i.e. was never held back.
    pidfd = os.pidfd_open(pid)
    try:
        deadline = time.monotonic() + 10
        last: int | None = None
        while True:
            position = read_position(pid, "/big")
            if position is not None and position == last and blocked_writing_a_pipe(pid):
                break
            last = position
            assert time.monotonic() < deadline, "cat never stalled"
            ended = procfs.wait_fd(pidfd, time.monotonic() + 0.1)
            assert not ended, "cat wrote everything: the agent never stopped reading it"
    finally:
        os.close(pidfd)
    assert position < 3 << 20, f"the agent read {position} bytes ahead of a host not reading"
    result = client.collect(2)
    assert result.status == 0
    assert len(result.stdout) == len(data)
    assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(data).digest()


# --- the init process ----------------------------------------------------------------------------


def test_create_prepares_the_init_and_start_lets_it_go(
    start_agent: Callable[..., Client], share: Path
) -> None:
    client = greeted(start_agent)
    assert client.create(init=process(["sh", "-c", "echo $$ > /ran; echo hi"]))["ok"]
    [waiting] = agent_children(client)
    # Built and waiting before execve: still the agent's Python, the program not run yet.
    assert os.readlink(f"/proc/{waiting}/exe") == os.path.realpath(sys.executable)
    assert client.call("hello", version=protocol.VERSION)["ok"]
    assert not (share / C1 / "root" / "ran").exists()  # nor after a round trip
    exec_too_soon = client.exec(2, process(["true"]))
    assert not exec_too_soon["ok"] and "not running" in exec_too_soon["error"]
    reply = client.start()
    assert reply["ok"] and reply["pid"] == waiting
    result = client.collect(INIT)
    assert (result.status, result.stdout) == (0, b"hi\n")
    assert result.eofs == {protocol.STDOUT, protocol.STDERR}
    # It ran in its own PID namespace, as its PID 1.
    assert (share / C1 / "root" / "ran").read_text() == "1\n"


@pytest.mark.parametrize(
    ("init", "error"),
    [
        (
            process(["true"], cwd="/nonexistent"),
            'chdir to cwd ("/nonexistent") set in config.json failed: no such file or directory',
        ),
        (
            process(["no-such-binary"]),
            'exec: "no-such-binary": executable file not found in $PATH',
        ),
    ],
)
def test_a_prepared_init_that_cannot_start_fails_at_start(
    start_agent: Callable[..., Client], init: dict[str, Any], error: str
) -> None:
    client = greeted(start_agent)
    assert client.create(init=init)["ok"]
    reply = client.start()
    assert (reply["ok"], reply["error"]) == (False, error)
    # runc: the container is stopped, with nothing left of it.
    client.wait_for(lambda: not agent_children(client), "the failed init's end")
    again = client.start()
    assert not again["ok"] and "stopped" in again["error"]
    stopped = client.exec(2, process(["true"]))
    assert not stopped["ok"] and "not running" in stopped["error"]
    assert client.ps() == []
    assert client.exit_order() == []
    # The pod goes on: another container runs, and this one can be removed and made again.
    client.launch("c2", stream=11)
    assert run(client, ["echo", "still serving"], container="c2").stdout == b"still serving\n"
    assert client.call("remove", container=C1)["ok"]
    client.launch(C1)


def test_shutdown_ends_a_prepared_init_that_never_started(
    start_agent: Callable[..., Client],
) -> None:
    client = greeted(start_agent)
    assert client.create(init=process(["sleep", "100"]))["ok"]
    [waiting] = agent_children(client)
    assert client.call("shutdown")["ok"]
    assert client.proc.wait(timeout=10) == 0
    wait_gone([waiting], "the prepared process's end")


def test_init_exit_ends_the_container_without_waiting_for_its_pipes(
    start_agent: Callable[..., Client],
) -> None:
    client = greeted(start_agent)
    # The background sleep keeps init's stdout open: its EOF must not be waited for.
    init = client.launch(init=process(["sh", "-c", "sleep 100 & read x; exit 3"]))
    assert client.exec(3, process(["sleep", "100"]))["ok"]
    client.wait_for(lambda: len(descendants(init)) == 1, "the background sleep")
    [background] = descendants(init)
    client.stdin(INIT, b"go\n")
    # Waiting for the pipes' EOF would take the background sleep's 100 s: collect's 10 s fail.
    result = client.collect(INIT)
    assert result.status == 3
    assert result.eofs == {protocol.STDOUT, protocol.STDERR}
    assert client.collect(3).status == 137  # every other process dies with init
    assert not procfs.is_alive(background, None)
    # Orphans are reaped by the agent, as by PID 1: no zombies left below it.
    client.wait_for(lambda: not agent_children(client), "the orphan to be reaped")
    stopped = client.exec(4, process(["true"]))
    assert not stopped["ok"] and "not running" in stopped["error"]


# --- the pod model -------------------------------------------------------------------------------


def test_two_containers_have_their_own_mounts_root_hostname_and_processes(
    start_agent: Callable[..., Client], share: Path
) -> None:
    client = greeted(start_agent)
    one = client.launch(C1, init=process(["sh", "-c", "sleep 1001 & wait"]), hostname="one")
    two = client.launch("c2", stream=11, init=process(["sleep", "1002"]), hostname="two")
    script = (
        "hostname; readlink /proc/self/ns/mnt; readlink /proc/self/ns/uts; echo {0} > /{0}; ls /"
    )
    first = run(client, ["sh", "-c", script.format("only-c1")])
    second = run(client, ["sh", "-c", script.format("only-c2")], ident=12, container="c2")
    # Each sees its own root: the file written by the other is not there.
    assert b"only-c1" in first.stdout and b"only-c2" not in first.stdout
    assert b"only-c2" in second.stdout and b"only-c1" not in second.stdout
    assert (share / C1 / "root" / "only-c1").read_text() == "only-c1\n"
    assert not (share / "c2" / "root" / "only-c1").exists()
    # Its own hostname, UTS and mount namespaces (and neither is the agent's).
    name1, mnt1, uts1 = first.stdout.decode().split()[:3]
    name2, mnt2, uts2 = second.stdout.decode().split()[:3]
    assert (name1, name2) == ("one", "two")
    assert mnt1 != mnt2 and uts1 != uts2
    assert mnt1 == ns_of(one, "mnt") and mnt2 == ns_of(two, "mnt")
    assert ns_of(client.proc.pid, "mnt") not in (mnt1, mnt2)
    # A mount made in one (its /dev/shm tmpfs) holds what it wrote; the other's does not.
    assert run(client, ["sh", "-c", "echo x > /dev/shm/mark"], ident=3).status == 0
    look = run(client, ["ls", "/dev/shm"], ident=13, container="c2")
    assert look.stdout == b""
    assert run(client, ["ls", "/dev/shm"], ident=4).stdout == b"mark\n"
    # `ps` of each lists its own processes only (exec'd ones: see
    # test_ps_and_signal_all_include_exec_processes).
    client.wait_for(lambda: len(descendants(one)) == 1, "c1's background sleep")
    assert client.ps(C1) == sorted([one, *descendants(one)])
    assert client.ps("c2") == [two]


def test_a_container_joins_another_ones_pid_ipc_and_uts_namespaces(
    start_agent: Callable[..., Client],
) -> None:
    client = greeted(start_agent)
    one = client.launch(C1, init=process(["sleep", "1001"]), hostname="one")
    shared = {"pid": "container:c1", "ipc": "container:c1", "uts": "container:c1"}
    two = client.launch(
        "c2", stream=11, init=process(["sleep", "1002"]), namespaces=shared, hostname="two"
    )
    client.launch("c3", stream=21, hostname="three")  # all its own: the contrast
    script = "hostname; readlink /proc/self/ns/ipc; readlink /proc/self/ns/pid; ps -o pid,args"
    first = run(client, ["sh", "-c", script]).stdout.decode().splitlines()
    second = run(client, ["sh", "-c", script], ident=12, container="c2").stdout.decode()
    third = run(client, ["sh", "-c", script], ident=22, container="c3").stdout.decode()
    second_lines = second.splitlines()
    # c1's hostname (c2's own config is not applied to a namespace it joined).
    assert (first[0], second_lines[0], third.splitlines()[0]) == ("one", "one", "three")
    # The same IPC and PID namespaces as c1's processes; c3's are others.
    assert second_lines[1:3] == first[1:3]
    assert third.splitlines()[1:3] != first[1:3]
    assert first[1] == ns_of(one, "ipc") == ns_of(two, "ipc")
    # c2's /proc (mounted from inside c1's PID namespace) shows c1's processes: PID 1 is c1's.
    assert re.search(r"^\s*1 sleep 1001$", second, re.M), second
    assert "sleep 1002" in second
    assert "sleep 1001" not in third and "sleep 1002" not in third
    # The agent's `ps` stays per container, though they share a PID namespace.
    assert (client.ps(C1), client.ps("c2"), client.ps("c3")) == ([one], [two], client.pids[2:3])


def test_own_pid_namespace_init_is_pid_1_and_ends_its_container(
    start_agent: Callable[..., Client],
) -> None:
    client = greeted(start_agent)
    init = client.launch(init=process(["sh", "-c", "echo $$; sleep 1000 & read x"]))
    client.wait_output(INIT, b"1\n")
    client.wait_for(lambda: len(descendants(init)) == 1, "the background sleep")
    [background] = descendants(init)
    exec_pid = client.exec(2, process(["sleep", "1000"]))["pid"]
    client.stdin(INIT, b"\n")  # the init exits 0
    client.wait_for(lambda: client.exited(INIT), "the init's exit")
    # The exec'd process was killed with it, and its exit was reported first.
    assert client.exit_order() == [2, INIT]
    assert (client.collect(2).status, client.collect(INIT).status) == (137, 0)
    assert not procfs.is_alive(background, None) and not procfs.is_alive(exec_pid, None)
    assert client.ps() == []


def test_init_exit_ends_a_container_in_the_vms_pid_namespace(
    start_agent: Callable[..., Client],
) -> None:
    """The `exit` of an init comes when every other process of its container has ended
    (docs/protocol.md), also without a PID namespace of its own to take them along."""
    client = greeted(start_agent)
    script = "sleep 1000 & read x; exit 3"
    init = client.launch(init=process(["sh", "-c", script]), namespaces={"pid": "vm"})
    client.wait_for(lambda: len(descendants(init)) == 1, "the background sleep")
    [background] = descendants(init)
    exec_pid = client.exec(2, process(["sleep", "1000"]))["pid"]
    client.stdin(INIT, b"go\n")
    client.wait_for(lambda: client.exited(INIT), "the init's exit")
    assert not procfs.is_alive(background, None), "the init's background sleep runs on"
    assert not procfs.is_alive(exec_pid, None), "the exec'd sleep runs on"
    assert client.exit_order() == [2, INIT]


def test_remove_kills_the_processes_and_frees_the_id(
    start_agent: Callable[..., Client], share: Path
) -> None:
    client = greeted(start_agent)
    init = client.launch(init=process(["sh", "-c", "sleep 1000 & wait"]))
    client.wait_for(lambda: len(descendants(init)) == 1, "the background sleep")
    background = descendants(init)
    exec_pid = client.exec(2, process(["sleep", "1000"]))["pid"]
    other = client.launch("c2", stream=11)
    assert client.call("remove", container=C1)["ok"]
    # Its processes ended (and were reported) before the reply; the other container runs on.
    assert set(client.exit_order()) == {INIT, 2}
    assert client.collect(INIT).status == client.collect(2).status == 137
    assert not any(procfs.is_alive(p, None) for p in [init, exec_pid, *background])
    assert procfs.is_alive(other, None)
    gone = client.call("ps", container=C1)
    assert (gone["ok"], gone["error"]) == (False, "container 'c1' does not exist")
    # The id (and the init's stream) can be used again, for a new container.
    (share / C1 / "root" / "mark").write_text("new\n")
    client.launch(C1, hostname="again")
    assert run(client, ["sh", "-c", "hostname; cat /mark"]).stdout == b"again\nnew\n"


def test_the_pod_model_refuses_what_it_cannot_do(start_agent: Callable[..., Client]) -> None:
    client = greeted(start_agent)
    client.launch(C1)
    twice = client.create(C1, stream=11)
    assert (twice["ok"], twice["error"]) == (False, "container c1 already exists")
    # A stream is a process of the whole pod: the init's and an exec'd one's are taken.
    assert client.exec(2, process(IDLE))["ok"]
    for stream in (INIT, 2):
        taken = client.create("c2", stream=stream)
        assert (taken["ok"], taken["error"]) == (False, f"process id {stream} is already in use")
        busy = client.exec(stream, process(["true"]))
        assert (busy["ok"], busy["error"]) == (False, f"process id {stream} is already in use")
    # Joining a namespace of a container that does not exist.
    lonely = client.create("c2", stream=11, namespaces={"ipc": "container:nope"})
    assert (lonely["ok"], lonely["error"]) == (
        False,
        "cannot join the ipc namespace of container nope: not running",
    )
    unknown = client.create("c2", stream=11, namespaces={"pid": "host"})
    assert not unknown["ok"] and "unknown value" in unknown["error"]
    fields: dict[str, Any] = {"stream": 11, "config": config(), "process": process(IDLE)}
    invalid = client.call("create", container="../c2", **fields)
    assert not invalid["ok"] and "invalid container id" in invalid["error"]
    missing = client.call("create", container="c9", **fields)  # no tree in the share
    assert not missing["ok"] and "not in the VM's share" in missing["error"]
    # None of these left anything: c2 can be made, with the stream 11 they asked for.
    assert client.create("c2", stream=11)["ok"]
    assert client.start("c2")["ok"]
    again = client.start("c2")
    assert (again["ok"], again["error"]) == (False, "container already started")
    # Exec into a container whose init has ended.
    assert client.call("signal", container="c2", signal=signal.SIGKILL)["ok"]
    assert client.collect(11).status == 137
    stopped = client.exec(12, process(["true"]), container="c2")
    assert not stopped["ok"] and "not running" in stopped["error"]
    assert not client.start("c2")["ok"]
    # Joining a namespace of a container that has stopped.
    late = client.create("c3", stream=21, namespaces={"uts": "container:c2"})
    assert not late["ok"] and "not running" in late["error"]


def test_exec_joins_the_containers_namespaces_and_root(
    start_agent: Callable[..., Client], share: Path
) -> None:
    client = greeted(start_agent)
    (client.add_tree(C1) / "mark").write_text("c1's root\n")
    init = client.launch(hostname="inside")
    assert os.uname().nodename != "inside"
    pid = client.exec(2, process(["sh", "-c", "hostname; cat /mark; exec sleep 1000"]))["pid"]
    client.wait_output(2, b"inside\nc1's root\n")
    for kind in ("mnt", "uts", "ipc", "pid"):
        assert ns_of(pid, kind) == ns_of(init, kind), kind
        assert ns_of(pid, kind) != ns_of(client.proc.pid, kind), kind
    # Its root is the container's tree, as the init's is.
    tree = (share / C1 / "root").stat().st_ino
    assert os.stat(f"/proc/{pid}/root").st_ino == os.stat(f"/proc/{init}/root").st_ino == tree
    assert os.stat(f"/proc/{pid}/root/mark").st_ino == (share / C1 / "root" / "mark").stat().st_ino


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_host_mode_as_pid1_of_a_pid_namespace(start_agent: Callable[..., Client]) -> None:
    """`--no-pid1` keeps host mode for an agent that is PID 1 of a PID namespace (as PID 1
    proper it would set the clock and remount "/"): it reaps as that namespace's init, and
    containers nest their own PID namespaces below it."""
    namespaces = ("unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--mount-proc")
    client = start_agent(namespaces, ("--no-pid1",))
    client.host_pids = False  # its pids are its namespace's
    assert client.call("hello", version=protocol.VERSION)["pid"] == 1
    [agent] = children(client.proc.pid)  # unshare's one child
    assert client.create(init=process(["sh", "-c", "echo $$; sleep 100 & read x; exit 3"]))["ok"]
    started = client.start()
    assert started["ok"] and started["pid"] > 1
    client.wait_output(INIT, b"1\n")
    # Pids as the agent's namespace numbers them; the host's for the checks below.
    [init] = children(agent)
    assert ns_pid(init, 1) == started["pid"]
    client.wait_for(lambda: len(descendants(init)) == 1, "the background sleep")
    [background] = descendants(init)
    client.stdin(INIT, b"\n")
    assert client.collect(INIT).status == 3
    assert not procfs.is_alive(background, None)  # it died with the init
    # An orphan of the agent's PID namespace comes to the agent, its init, to be reaped.
    client.launch("c2", stream=11, namespaces={"pid": "vm"})
    orphaner = run(client, ["sh", "-c", "sleep 1000 & echo $!"], ident=12, container="c2")
    orphan = int(orphaner.stdout)
    client.wait_for(lambda: orphan in {ns_pid(c, 1) for c in children(agent)}, "the adoption")
    [adopted] = [c for c in children(agent) if ns_pid(c, 1) == orphan]
    assert client.call("shutdown")["ok"]
    assert client.proc.wait(timeout=10) == 0
    wait_gone([agent, adopted], "the agent's and the orphan's end")


def children(pid: int) -> list[int]:
    return [child for child in descendants(pid) if status_field(child, "PPid") == str(pid)]


def ns_pid(pid: int, level: int) -> int:
    """Process ``pid``'s pid in the PID namespace ``level`` below ours (NSpid's fields)."""
    return int(status_field(pid, "NSpid").split()[level])


def status_field(pid: int, name: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == name:
                return value.strip()
    raise AssertionError(f"no {name} in /proc/{pid}/status")


# --- helpers shared with the host ---------------------------------------------------------------


def test_resolve_in_root_never_leaves_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "real").mkdir(parents=True)
    (root / "abs").symlink_to("/real")
    (root / "up").symlink_to("../../../..")
    (root / "loop").symlink_to("loop")
    r = str(root)
    assert resolve_in_root(r, "/abs/x") == f"{r}/real/x"
    assert resolve_in_root(r, "/up/etc/passwd") == f"{r}/etc/passwd"
    assert resolve_in_root(r, "/../../real/./new/..") == f"{r}/real"
    assert resolve_in_root(r, "missing/a/../b") == f"{r}/missing/b"
    with pytest.raises(OSError):
        resolve_in_root(r, "/loop")


def test_mount_options_translate_to_flags_and_data() -> None:
    flags, propagation, data = parse_mount_options(
        ["nosuid", "noexec", "ro", "rw", "mode=755", "size=65536k", "rprivate", "tmpcopyup"]
    )
    assert flags == 0x2 | 0x8
    assert propagation == 0x40000 | 0x4000
    assert data == "mode=755,size=65536k"


def _preload_in_fresh_python(dist_packages: str) -> bool:
    """Whether syscallfilter.preload() leaves the bindings loaded in a fresh Python whose
    Debian bindings are at ``dist_packages`` (an exception fails the run)."""
    probe = (
        "import json, sys\n"
        "from bonneville.guest import syscallfilter\n"
        f"syscallfilter.DIST_PACKAGES = {dist_packages!r}\n"
        "sys.path = [p for p in sys.path if 'dist-packages' not in p]\n"
        "syscallfilter.preload()\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    return "seccomp" in modules_imported_by(probe)


def test_seccomp_bindings_are_preloaded_for_the_template() -> None:
    """A VM's agent loads libseccomp before the template is saved (mode.start): every clone
    then has it, instead of loading it at its first container."""
    assert _preload_in_fresh_python("/usr/lib/python3/dist-packages")


def test_preloading_without_bindings_is_silent() -> None:
    # The refusal comes later, from the first container that has a profile.
    assert not _preload_in_fresh_python("/nonexistent/dist-packages")

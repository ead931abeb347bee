"""The guest agent in host mode (as the fake backend runs it), driven over a socketpair.

Each test starts `python -m bonneville.guest.agent --fd N --root DIR` with a busybox root,
speaks docs/protocol.md to it with bonneville.guest.protocol, and kills it (and everything it
started) at the end. Needs root: the agent mounts, in a private mount namespace of its own.
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
from bonneville.guest.agent import parse_mount_options, resolve_in_root
from bonneville.guest.proc import descendants
from bonneville.spec.defaults import default_spec

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the agent mounts: needs root")

Frame = tuple[int, int, bytes]
DEFAULT_CAPS_MASK = "0000000020000420"  # CAP_KILL | CAP_NET_BIND_SERVICE | CAP_AUDIT_WRITE


@dataclass
class Result:
    status: int
    signal: int | None
    stdout: bytes
    stderr: bytes
    eofs: set[int] = field(default_factory=set)


class Client:
    """The host end, as small as the tests need; frames other than replies are kept in order."""

    def __init__(self, sock: socket.socket, proc: subprocess.Popen[bytes]) -> None:
        self.sock = sock
        self.proc = proc
        self.decoder = protocol.Decoder()
        self.frames: list[Frame] = []
        self.replies: dict[int, dict[str, Any]] = {}
        self.next_req = 1
        self.eof = False
        self.pids: list[int] = []

    def send(self, frame: bytes) -> None:
        self.sock.sendall(frame)

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

    def exec(self, ident: int, process: dict[str, Any], stdin: bool = False) -> dict[str, Any]:
        reply = self.call("exec", id=ident, process=process, stdin=stdin)
        if reply["ok"]:
            self.pids.append(reply["pid"])
        return reply

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
def start_agent(tmp_path: Path) -> Iterator[Callable[..., Client]]:
    clients: list[Client] = []

    def start(root: Path, prefix: tuple[str, ...] = ()) -> Client:
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
                    str(root),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(theirs.fileno(),),
                close_fds=True,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": ":".join(sys.path)},
                start_new_session=True,
            )
        theirs.close()
        client = Client(ours, proc)
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.stop()


@pytest.fixture
def rootfs(tmp_path: Path, busybox_rootfs: Path) -> Path:
    """A private copy of the busybox root, for tests that write into it."""
    copy = tmp_path / "rootfs"
    shutil.copytree(busybox_rootfs, copy, symlinks=True)
    return copy


def container(**overrides: Any) -> dict[str, Any]:
    """The `setup.container` the monitor derives from the default config.json."""
    spec = default_spec()
    value: dict[str, Any] = {
        "hostname": "bonnie",
        "domainname": "example.org",
        "readonly": False,
        "mounts": spec["mounts"],
        "maskedPaths": [*spec["linux"]["maskedPaths"], "/proc/no-such-file"],
        "readonlyPaths": spec["linux"]["readonlyPaths"],
        "sysctl": {},
        "time": time.time(),
        "entropy": base64.b64encode(os.urandom(64)).decode(),
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


def ready(start_agent: Callable[..., Client], root: Path, **overrides: Any) -> Client:
    client = start_agent(root)
    assert client.call("hello", version=protocol.VERSION)["ok"]
    reply = client.call("setup", container=container(**overrides))
    assert reply["ok"], reply
    return client


def run(client: Client, args: list[str], ident: int = 2, **overrides: Any) -> Result:
    reply = client.exec(ident, process(args, **overrides))
    assert reply["ok"], reply
    return client.collect(ident)


def test_hello_reports_the_version_and_refuses_another(
    start_agent: Callable[..., Client], busybox_rootfs: Path
) -> None:
    client = start_agent(busybox_rootfs)
    reply = client.call("hello", version=protocol.VERSION)
    assert reply["ok"] and reply["version"] == protocol.VERSION
    assert reply["pid"] == client.proc.pid
    assert reply["kernel"] == os.uname().release
    refused = client.call("hello", version=99)
    assert not refused["ok"] and "version" in refused["error"]
    assert not client.call("frobnicate")["ok"]
    early = client.call("exec", id=2, process=process(["true"]), stdin=False)
    assert not early["ok"] and "not set up" in early["error"]


def test_setup_builds_proc_dev_devpts_and_masks(
    start_agent: Callable[..., Client], busybox_rootfs: Path
) -> None:
    client = ready(start_agent, busybox_rootfs)
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
    # All of it happened in the agent's own mount namespace, never in ours.
    with open("/proc/self/mounts") as f:
        assert str(busybox_rootfs) not in f.read()
    again = client.call("setup", container=container())
    assert not again["ok"] and "already" in again["error"]


def test_setup_failure_names_the_mount(
    start_agent: Callable[..., Client], busybox_rootfs: Path
) -> None:
    client = start_agent(busybox_rootfs)
    bad = {"destination": "/proc", "type": "nosuchfs", "source": "x", "options": []}
    reply = client.call("setup", container=container(mounts=[bad]))
    assert not reply["ok"]
    assert reply["error"] == "mount nosuchfs on /proc: no such device"


def test_setup_in_two_stages(start_agent: Callable[..., Client], busybox_rootfs: Path) -> None:
    """`setup` with stage "early" builds all but the network while the host runs the prestart
    hooks; the `setup` after them finishes (and builds nothing twice); a stage comes once."""
    client = start_agent(busybox_rootfs)
    unknown = client.call("setup", stage="later", container=container())
    assert not unknown["ok"] and "unknown stage" in unknown["error"]
    early = client.call("setup", stage="early", container=container())
    assert early["ok"], early
    assert [lap[0] for lap in early["timings"]][-1] == "read-only and masked paths"
    exec_too_soon = client.call("exec", id=2, process=process(["true"]), stdin=False)
    assert not exec_too_soon["ok"] and "not set up" in exec_too_soon["error"]
    twice = client.call("setup", stage="early", container=container())
    assert not twice["ok"] and "already built" in twice["error"]
    rest = client.call("setup", container=container())
    assert rest["ok"] and rest["timings"] == []  # host mode: no network to configure
    assert run(
        client, ["sh", "-c", "hostname; grep -c ' /proc/acpi ' /proc/self/mounts"]
    ).stdout == (b"bonnie\n1\n")


def test_setup_after_a_failed_early_stage_fails_alike(
    start_agent: Callable[..., Client], busybox_rootfs: Path
) -> None:
    """A container whose early stage failed half-way is never finished by the later setup."""
    client = start_agent(busybox_rootfs)
    bad = {"destination": "/proc", "type": "nosuchfs", "source": "x", "options": []}
    early = client.call("setup", stage="early", container=container(mounts=[bad]))
    assert early["error"] == "mount nosuchfs on /proc: no such device"
    rest = client.call("setup", container=container())
    assert (rest["ok"], rest["error"]) == (False, early["error"])


def test_exec_output_eof_frames_and_exit_status(
    start_agent: Callable[..., Client], busybox_rootfs: Path
) -> None:
    client = ready(start_agent, busybox_rootfs)
    result = run(client, ["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (result.stdout, result.stderr) == (b"out\n", b"err\n")
    assert result.eofs == {protocol.STDOUT, protocol.STDERR}  # both before `exit`
    assert (result.status, result.signal) == (7, None)
    # Without stdin the process reads /dev/null.
    assert run(client, ["cat"], ident=3).stdout == b""


def test_stdin_round_trip_and_eof(start_agent: Callable[..., Client], busybox_rootfs: Path) -> None:
    client = ready(start_agent, busybox_rootfs)
    assert client.exec(2, process(["cat"]), stdin=True)["ok"]
    client.stdin(2, b"hello\n")
    client.wait_output(2, b"hello\n")  # echoed while stdin is still open
    client.stdin(2, b"x" * 300_000)  # more than a pipe holds: buffered, not blocking
    client.stdin(2, b"")
    result = client.collect(2)
    assert result.stdout == b"hello\n" + b"x" * 300_000
    assert result.status == 0


def test_signal_term_and_unknown_process(
    start_agent: Callable[..., Client], busybox_rootfs: Path
) -> None:
    client = ready(start_agent, busybox_rootfs)
    assert client.exec(2, process(["sleep", "100"]))["ok"]
    assert client.call("signal", id=2, signal=signal.SIGTERM, all=False)["ok"]
    result = client.collect(2)
    assert (result.status, result.signal) == (143, signal.SIGTERM)
    missing = client.call("signal", id=9, signal=signal.SIGTERM, all=False)
    assert (missing["ok"], missing["error"]) == (False, "no such process")


def test_signal_all_and_ps(start_agent: Callable[..., Client], busybox_rootfs: Path) -> None:
    client = ready(start_agent, busybox_rootfs)
    first = client.exec(2, process(["sleep", "100"]))["pid"]
    second = client.exec(3, process(["sh", "-c", "sleep 100 & echo $!; wait"]))["pid"]
    client.wait_output(3, b"\n")
    grandchild = int(client.output(3))
    pids = client.call("ps")["pids"]
    assert {first, second, grandchild} <= set(pids)
    assert client.proc.pid not in pids
    assert client.call("signal", id=2, signal=signal.SIGKILL, all=True)["ok"]
    assert client.collect(2).status == 137
    assert client.collect(3).status == 137
    client.wait_for(lambda: client.call("ps")["pids"] == [], "the container to empty")


def test_missing_binary_is_refused_with_runc_wording(
    start_agent: Callable[..., Client], busybox_rootfs: Path
) -> None:
    client = ready(start_agent, busybox_rootfs)
    reply = client.exec(2, process(["no-such-binary"]))
    assert not reply["ok"]
    assert reply["error"] == 'exec: "no-such-binary": executable file not found in $PATH'
    reply = client.exec(3, process(["/bin/nope"]))
    assert reply["error"] == 'exec: "/bin/nope": stat /bin/nope: no such file or directory'
    # The id is free again and the agent still serves.
    assert run(client, ["true"]).status == 0
    assert not client.controls("exit")


def test_missing_cwd_is_refused(start_agent: Callable[..., Client], busybox_rootfs: Path) -> None:
    client = ready(start_agent, busybox_rootfs)
    reply = client.exec(2, process(["true"], cwd="/nonexistent"))
    assert not reply["ok"]
    assert reply["error"] == (
        'chdir to cwd ("/nonexistent") set in config.json failed: no such file or directory'
    )
    assert run(client, ["pwd"], cwd="/etc").stdout == b"/etc\n"


def agent_children(client: Client) -> list[int]:
    """The agent's processes (prepared or running) and theirs."""
    return descendants(client.proc.pid)


def prepared(start_agent: Callable[..., Client], root: Path, init: dict[str, Any]) -> Client:
    """An agent set up with ``init`` as the process to prepare, once it is waiting."""
    client = start_agent(root)
    assert client.call("hello", version=protocol.VERSION)["ok"]
    assert client.call("setup", container=container(), process=init)["ok"]
    client.wait_for(lambda: bool(agent_children(client)), "the prepared init process")
    return client


def test_setup_prepares_the_init_process_and_exec_lets_it_go(
    start_agent: Callable[..., Client], rootfs: Path
) -> None:
    init = process(["sh", "-c", "echo $$ > /ran; echo hi"])
    client = prepared(start_agent, rootfs, init)
    [waiting] = agent_children(client)
    time.sleep(0.3)
    assert not (rootfs / "ran").exists()  # forked and set up, not exec'd before start
    reply = client.exec(protocol.INIT_STREAM, init, stdin=True)
    assert reply["ok"] and reply["pid"] == waiting
    result = client.collect(protocol.INIT_STREAM)
    assert (result.status, result.stdout) == (0, b"hi\n")
    assert (rootfs / "ran").read_text() == f"{waiting}\n"


def test_a_prepared_init_that_cannot_start_fails_at_start(
    start_agent: Callable[..., Client], busybox_rootfs: Path
) -> None:
    init = process(["true"], cwd="/nonexistent")
    client = start_agent(busybox_rootfs)
    assert client.call("hello", version=protocol.VERSION)["ok"]
    assert client.call("setup", container=container(), process=init)["ok"]
    reply = client.exec(protocol.INIT_STREAM, init, stdin=True)
    assert not reply["ok"]
    assert reply["error"] == (
        'chdir to cwd ("/nonexistent") set in config.json failed: no such file or directory'
    )
    assert run(client, ["echo", "still serving"]).stdout == b"still serving\n"


def test_another_process_than_the_prepared_one_is_forked_anew(
    start_agent: Callable[..., Client], busybox_rootfs: Path
) -> None:
    client = prepared(start_agent, busybox_rootfs, process(["echo", "prepared"]))
    [waiting] = agent_children(client)
    reply = client.exec(protocol.INIT_STREAM, process(["echo", "other"]), stdin=True)
    assert reply["ok"] and reply["pid"] != waiting
    assert client.collect(protocol.INIT_STREAM).stdout == b"other\n"
    client.wait_for(lambda: not procfs.is_alive(waiting, None), "the unused child's end")


def test_shutdown_ends_a_prepared_init_that_never_started(
    start_agent: Callable[..., Client], busybox_rootfs: Path
) -> None:
    client = prepared(start_agent, busybox_rootfs, process(["sleep", "100"]))
    [waiting] = agent_children(client)
    assert client.call("shutdown")["ok"]
    assert client.proc.wait(timeout=10) == 0
    deadline = time.monotonic() + 5
    while procfs.is_alive(waiting, None):
        assert time.monotonic() < deadline, "the prepared process outlived the agent"
        time.sleep(0.01)


def test_user_groups_env_and_no_caps_for_non_root(
    start_agent: Callable[..., Client], busybox_rootfs: Path
) -> None:
    client = ready(start_agent, busybox_rootfs)
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


def test_default_capabilities_are_really_dropped(
    start_agent: Callable[..., Client], busybox_rootfs: Path
) -> None:
    client = ready(start_agent, busybox_rootfs)
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


def test_terminal_tty_and_resize(start_agent: Callable[..., Client], busybox_rootfs: Path) -> None:
    client = ready(start_agent, busybox_rootfs)
    proc = process(
        ["sh", "-c", "tty; stty size; read line; stty size; echo err >&2"],
        terminal=True,
        consoleSize={"height": 24, "width": 80},
    )
    assert client.exec(1, proc, stdin=True)["ok"]
    client.wait_output(1, b"24 80\r\n")
    assert re.match(rb"/dev/pts/\d+\r\n", client.output(1)), client.output(1)
    assert client.call("resize", id=1, rows=50, cols=132)["ok"]
    client.stdin(1, b"go\n")
    result = client.collect(1)
    assert result.stdout.endswith(b"50 132\r\nerr\r\n")
    assert result.stderr == b"" and result.eofs == {protocol.STDOUT}
    assert result.status == 0
    assert not client.call("resize", id=1, rows=1, cols=1)["ok"]


def test_rlimits_umask_oom_score_and_hostname(
    start_agent: Callable[..., Client], busybox_rootfs: Path
) -> None:
    client = ready(start_agent, busybox_rootfs)
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
    assert os.uname().nodename != "bonnie"  # the agent's own UTS namespace
    assert run(client, ["sh", "-c", "umask"], ident=3).stdout == b"0022\n"
    bad = client.exec(4, process(["true"], rlimits=[{"type": "RLIMIT_BOGUS", "soft": 1}]))
    assert not bad["ok"] and "RLIMIT_BOGUS" in bad["error"]


def test_readonly_root(start_agent: Callable[..., Client], busybox_rootfs: Path) -> None:
    client = ready(start_agent, busybox_rootfs, readonly=True)
    result = run(client, ["sh", "-c", "touch /x; touch /dev/shm/y && echo shm-ok"])
    assert b"Read-only file system" in result.stderr
    assert result.stdout == b"shm-ok\n"


def test_init_exit_ends_the_container_without_waiting_for_its_pipes(
    start_agent: Callable[..., Client], busybox_rootfs: Path
) -> None:
    client = ready(start_agent, busybox_rootfs)
    assert client.exec(3, process(["sleep", "100"]))["ok"]
    # The background sleep keeps init's stdout open: its EOF must not be waited for.
    assert client.exec(1, process(["sh", "-c", "sleep 100 & echo $!; exit 3"]))["ok"]
    started = time.monotonic()
    result = client.collect(1)
    assert result.status == 3 and time.monotonic() - started < 5
    assert result.eofs == {protocol.STDOUT, protocol.STDERR}
    background = int(result.stdout)
    assert client.collect(3).status == 137  # every other process dies with init
    client.wait_for(lambda: not procfs.is_alive(background, None), "the orphan to be killed")
    # Orphans are reaped by the agent, as by PID 1: no zombies left below it.
    client.wait_for(lambda: not procfs.descendants(client.proc.pid), "the orphan to be reaped")


def read_position(pid: int, name: str) -> int | None:
    """How far process ``pid`` has read the file ``name`` (its fdinfo ``pos``), None if it has
    not opened it (yet)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if os.readlink(f"/proc/{pid}/fd/{fd}").endswith(name):
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                return int(f.readline().split()[1])
    return None


def test_large_output_arrives_intact_with_backpressure(
    start_agent: Callable[..., Client], rootfs: Path
) -> None:
    data = os.urandom(5 << 20)
    (rootfs / "big").write_bytes(data)
    client = ready(start_agent, rootfs)
    pid = client.exec(2, process(["cat", "/big"]))["pid"]
    # While we do not read, the agent must stop reading cat once ~1 MiB waits for us.
    deadline = time.monotonic() + 10
    last: int | None = None
    while (position := read_position(pid, "/big")) is None or position != last:
        assert time.monotonic() < deadline, "cat never stopped"
        last = position
        time.sleep(0.1)  # sampling cat's progress until it stalls
    assert position < 3 << 20, f"the agent read {position} bytes ahead of a host not reading"
    result = client.collect(2)
    assert result.status == 0
    assert len(result.stdout) == len(data)
    assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(data).digest()


def test_malformed_control_frame_is_logged_and_serving_continues(
    start_agent: Callable[..., Client], busybox_rootfs: Path
) -> None:
    client = start_agent(busybox_rootfs)
    client.send(protocol.encode(protocol.CONTROL, 0, b"{not json"))
    client.send(protocol.encode(protocol.CONTROL, 0, json.dumps([1, 2]).encode()))
    assert client.call("hello", version=protocol.VERSION)["ok"]
    errors = [m["msg"] for m in client.controls("log") if m["level"] == "error"]
    assert len(errors) == 2 and all("malformed" in m for m in errors)


def test_broken_framing_closes_the_channel_cleanly(
    start_agent: Callable[..., Client], busybox_rootfs: Path
) -> None:
    client = ready(start_agent, busybox_rootfs)
    assert client.exec(2, process(["sleep", "100"]))["ok"]
    client.send(b"\x09\x00\x00\x00\x00\x00\x00\x00")  # frame type 9 does not exist
    client.wait_for(lambda: client.eof, "the agent to close")
    assert any("protocol error" in m["msg"] for m in client.controls("log"))
    assert client.proc.wait(timeout=10) == 0
    assert not procfs.is_alive(client.pids[0], None)


def test_shutdown_replies_then_stops_everything(
    start_agent: Callable[..., Client], busybox_rootfs: Path
) -> None:
    client = ready(start_agent, busybox_rootfs)
    assert client.exec(1, process(["sleep", "100"]))["ok"]
    assert client.call("shutdown")["ok"]
    assert client.proc.wait(timeout=10) == 0
    assert not procfs.is_alive(client.pids[0], None)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_pid1_mode_in_a_pid_namespace(
    start_agent: Callable[..., Client], busybox_rootfs: Path
) -> None:
    """The PID 1 paths for real: kill(-1), reaping as init, ignored signals, reboot(2) (which
    in a child pid namespace just ends it)."""
    namespaces = ("unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--mount-proc")
    client = start_agent(busybox_rootfs, namespaces)
    assert client.call("hello", version=protocol.VERSION)["pid"] == 1
    # As PID 1 the clock, sysctls and entropy are guest-wide: here they would be the host's.
    setup = container(time=None, entropy="", sysctl={})
    assert client.call("setup", container=setup)["ok"]
    script = "kill -INT 1; kill -TERM 1; sleep 100 & echo $!; exit 3"
    assert client.call("exec", id=1, process=process(["sh", "-c", script]))["ok"]
    assert client.collect(1).status == 3
    assert client.call("ps")["pids"] == []  # the background sleep died with init, was reaped
    assert client.call("hello", version=protocol.VERSION)["ok"]  # SIGINT/SIGTERM ignored
    assert client.call("shutdown")["ok"]
    client.proc.wait(timeout=10)


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

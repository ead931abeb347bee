"""Helpers shared by tests/ (unit, fake backend), integration/ (real VMs and daemons) and
benchmarks/: bundles, the CLI of this checkout, leftovers, a private dockerd.

The fixtures built on them are in the root conftest.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# The repository this file belongs to: its bonneville/ package is what the tests test.
CHECKOUT = Path(__file__).resolve().parent.parent

# install.sh writes /usr/local/bin/bonneville in this shape (its comments say why: -S for the
# start-up time, the checkout first, the venv's site-packages last).
LAUNCHER = """\
#!{python} -S
# A launcher for the checkout {checkout} (tests/support.py).
import sys

sys.path[:0] = [{checkout!r}]
sys.path.append({site!r})
from bonneville.shim.entry import main

main()
"""


def venv_python() -> tuple[str, str]:
    """(interpreter, its site-packages) of the venv with Bonneville's dependencies: this
    interpreter's if it runs in a venv (test.sh runs pytest in install.sh's), else that of
    $BONNEVILLE_VENV, by default install.sh's /opt/bonneville/venv (soak.py under sudo)."""
    if sys.prefix != sys.base_prefix:
        return sys.executable, sysconfig.get_path("purelib")
    python = os.path.join(
        os.environ.get("BONNEVILLE_VENV", "/opt/bonneville/venv"), "bin", "python3"
    )
    asked = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = subprocess.run([python, "-c", asked], capture_output=True, text=True, check=True)
    return python, site.stdout.strip()


def write_launcher(directory: Path, checkout: Path = CHECKOUT) -> Path:
    """A `bonneville` in ``directory`` that runs ``checkout``'s code with the venv's
    dependencies (:func:`venv_python`), made as install.sh makes the installed one."""
    path = directory / "bonneville"
    python, site = venv_python()
    path.write_text(LAUNCHER.format(python=python, checkout=str(checkout), site=site))
    path.chmod(0o755)
    return path


_launcher: Path | None = None


def use_checkout_launcher() -> Path:
    """Put a `bonneville` of this checkout first on PATH, and the checkout first on PYTHONPATH,
    for this process and everything it starts (dockerd and containerd find their runtime by
    that path; Pythons the tests start import this checkout's bonneville, not the installed
    one). Once per process; the launcher's path.

    Its directory is the checkout's own under /tmp (written afresh, atomically, each time,
    never removed: runs of one checkout may overlap, and a run that is killed leaves nothing
    more than the last one did)."""
    global _launcher
    if _launcher is None:
        key = hashlib.sha256(str(CHECKOUT).encode()).hexdigest()[:12]
        directory = Path(tempfile.gettempdir(), f"bonneville-launcher-{key}")
        directory.mkdir(mode=0o755, exist_ok=True)
        if os.lstat(directory).st_uid != os.getuid() or directory.is_symlink():
            raise RuntimeError(f"{directory} is not this user's own directory")
        written = write_launcher(Path(tempfile.mkdtemp(dir=directory)))
        _launcher = written.rename(directory / "bonneville")
        written.parent.rmdir()
        for name, first in (("PATH", str(directory)), ("PYTHONPATH", str(CHECKOUT))):
            rest = os.environ.get(name)
            os.environ[name] = f"{first}:{rest}" if rest else first
    return _launcher


BUSYBOX = "/bin/busybox"


def make_busybox_rootfs(rootfs: Path) -> Path:
    """A minimal container root made from Debian's busybox-static (no registry needed)."""
    for d in ("bin", "sbin", "etc", "tmp", "proc", "sys", "dev", "root", "home", "var", "run"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    os.chmod(rootfs / "tmp", 0o1777)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    applets = subprocess.run(
        [BUSYBOX, "--list"], check=True, capture_output=True, text=True
    ).stdout.split()
    for applet in applets:
        link = rootfs / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    (rootfs / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    )
    (rootfs / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    return rootfs


def default_config(args: list[str], terminal: bool = False) -> dict[str, object]:
    """The config.json `bonneville spec` would write, with the given args and a writable root."""
    from bonneville.spec.defaults import default_spec

    config = default_spec()
    process = config["process"]
    assert isinstance(process, dict)
    process["args"] = args
    process["terminal"] = terminal
    # runc's default root is read-only; tests write into it and check from the host.
    config["root"] = {"path": "rootfs", "readonly": False}
    return config


def write_bundle(bundle: Path, config: dict[str, object], rootfs: Path | None = None) -> Path:
    bundle.mkdir(parents=True, exist_ok=True)
    if rootfs is None:
        make_busybox_rootfs(bundle / "rootfs")
    elif rootfs != bundle / "rootfs":
        (bundle / "rootfs").symlink_to(rootfs)
    (bundle / "config.json").write_text(json.dumps(config, indent=2))
    return bundle


class Runtime:
    """Runs `bonneville` (this checkout's: :func:`use_checkout_launcher`) with its own --root
    and backend."""

    def __init__(self, root: Path, backend: str) -> None:
        self.root = root
        self.backend = backend

    def argv(self, *args: str) -> list[str]:
        return ["bonneville", "--root", str(self.root), "--backend", self.backend, *args]

    def __call__(
        self, *args: str, input: bytes | None = None, timeout: float = 180, check: bool = False
    ) -> subprocess.CompletedProcess[bytes]:
        # Files, not pipes: after `create`, the monitor keeps the container's stdio open (as
        # runc's container does), so reading a pipe to EOF would wait for the container.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.run(
                self.argv(*args),
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                timeout=timeout,
                check=False,
            )
            out.seek(0)
            err.seek(0)
            result = subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())
        if check and result.returncode != 0:
            raise AssertionError(
                f"bonneville {' '.join(args)} failed ({result.returncode}): {result.stderr!r}"
            )
        return result

    def state(self, container_id: str) -> dict[str, object]:
        result = self("state", container_id, check=True)
        data = json.loads(result.stdout)
        assert isinstance(data, dict)
        return data

    def cleanup(self) -> None:
        if self.root.exists():
            for name in os.listdir(self.root):
                self("delete", "--force", name)


def in_private_netns(script: str, *, own_sysfs: bool = False) -> Any:
    """Run a Python ``script`` in a new network namespace (unshare); the JSON it prints. With
    ``own_sysfs``, in a new mount namespace too, with a sysfs of the new network namespace on
    /sys (for code that reads /sys/class/net, as the guest agent does)."""
    prefix = ["unshare", "--net"]
    if own_sysfs:
        script = "import os; os.system('mount -t sysfs sysfs /sys')\n" + script
        prefix.append("--mount")
    result = subprocess.run(
        [*prefix, sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def kill_monitor_during_create(
    rt: Runtime, bundle: Path, cid: str, launched: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Run ``create`` and SIGKILL its monitor as soon as the backend's launch journal satisfies
    ``launched`` (before create has recorded the VM); check that create then fails with one
    line, leaving no state. The journal as it was at the kill."""
    import signal
    import time

    from bonneville.backends.base import JOURNAL_FILE, read_journal

    directory = rt.root / cid
    with tempfile.TemporaryFile() as err:
        create = subprocess.Popen(
            rt.argv("create", "--bundle", str(bundle), cid),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        deadline = time.monotonic() + 60
        while not ((directory / JOURNAL_FILE).exists() and launched(read_journal(str(directory)))):
            assert create.poll() is None, "create ended before the launch got that far"
            assert time.monotonic() < deadline, "the launch never got that far"
            time.sleep(0.05)
        journal = read_journal(str(directory))
        monitor = json.loads((directory / "state.json").read_text())["pid"]
        os.kill(int(monitor), signal.SIGKILL)
        assert create.wait(timeout=120) != 0
        err.seek(0)
        assert err.read().strip().count(b"\n") == 0  # one line
    assert not directory.exists()
    return journal


def _host_links_of_ours() -> set[str]:
    from bonneville.backends.libvirt.hostnet import OUR_LINK

    shown = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, check=True).stdout
    return {link["ifname"] for link in json.loads(shown) if OUR_LINK.match(link["ifname"])}


# Links of our pattern that were here before this session (a run killed part-way, e.g. by a
# machine restart, left them): not this run's leak, and named in the report header.
LINKS_AT_START = _host_links_of_ours() if shutil.which("ip") else set()


def host_links_of_ours() -> list[str]:
    """Links in this (the host's) network namespace named as the libvirt backend names its
    own (``hostnet.OUR_LINK``), except those :data:`LINKS_AT_START`."""
    return sorted(_host_links_of_ours() - LINKS_AT_START)


def leftover_processes(marker: str) -> list[str]:
    """Command lines of live processes mentioning ``marker`` (a test's unique root path)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat", "rb") as f:
                zombie = f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
        except OSError:
            continue
        if marker in cmd and not zombie:
            found.append(f"{pid}: {cmd}")
    return found


def terminate(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM a process the tests started, SIGKILL it if it outlives ``timeout``, reap it."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stop_daemon(daemon: subprocess.Popen[bytes], base: Path) -> None:
    """Stop a daemon the tests started (TERM, then KILL), unmount what it left under ``base``
    and remove ``base``."""
    import signal

    daemon.send_signal(signal.SIGTERM)
    try:
        daemon.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait()
    for mount in reversed(Path("/proc/self/mounts").read_text().splitlines()):
        target = mount.split()[1]
        if target.startswith(str(base)):
            subprocess.run(["umount", "-l", target], check=False)


# ---- a private dockerd (integration tests and benchmarks) -----------------------------------

DOCKER_BRIDGE_PREFIX = "bvtest"  # every bridge of the private dockerd's networks
DOCKER_BRIDGE = DOCKER_BRIDGE_PREFIX + "0"
DOCKER_BRIDGE_ADDRESS = "172.31.250.1/24"


class Docker:
    """The docker CLI aimed at one private daemon."""

    def __init__(self, socket_path: str, runtime: str = "bonneville") -> None:
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{socket_path}"}
        self.socket_path = socket_path
        self.runtime = runtime  # the dockerd runtime (one per backend) `run` uses

    def __call__(
        self, *args: str, input: bytes | None = None, timeout: float = 180
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["docker", *args],
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )

    def ok(self, *args: str, input: bytes | None = None) -> str:
        result = self(*args, input=input)
        assert result.returncode == 0, f"docker {' '.join(args)}: {result.stderr!r}"
        return result.stdout.decode()

    def run(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return self("run", "--rm", "--runtime", self.runtime, *args, input=input)


@contextlib.contextmanager
def forwarding_accepted(interfaces: str) -> Iterator[None]:
    """Packets to and from the bridges ``interfaces`` (an iptables name, ``bvtest+``) pass the
    host's FORWARD chain while the private daemon runs: a host whose own dockerd set FORWARD's
    policy to DROP (and bridge-nf-call-iptables, which sends bridged frames through it) must not
    cut our containers off from each other. Rules of our own, first in the chain, removed
    afterwards; nothing else of the host's firewall is touched."""
    rules = [["-i", interfaces, "-j", "ACCEPT"], ["-o", interfaces, "-j", "ACCEPT"]]
    tools = [tool for tool in ("iptables", "ip6tables") if shutil.which(tool)]
    added: list[tuple[str, list[str]]] = []
    try:
        for tool in tools:
            for rule in rules:
                subprocess.run([tool, "-w", "-I", "FORWARD", *rule], check=True)
                added.append((tool, rule))
        yield
    finally:
        for tool, rule in added:
            subprocess.run([tool, "-w", "-D", "FORWARD", *rule], check=False)


# The bridges of networks the tests create: covered by the rules of forwarding_accepted.
def network_bridge_option(name: str) -> list[str]:
    """`docker network create` options that name the network's bridge after ``name``."""
    return ["-o", f"com.docker.network.bridge.name={DOCKER_BRIDGE_PREFIX}-{name}"]


@contextlib.contextmanager
def private_dockerd(runtimes: dict[str, dict[str, object]], image: str) -> Iterator[Docker]:
    """A dockerd of our own (data-root, exec-root, socket and bridge under /tmp) with these
    runtimes (daemon.json's form: name → {"path", "runtimeArgs"}) and a busybox ``image``;
    everything it made is gone afterwards. Its bridges forward whatever the host's FORWARD
    policy is (forwarding_accepted)."""
    with (
        forwarding_accepted(DOCKER_BRIDGE_PREFIX + "+"),
        _private_dockerd(runtimes, image) as client,
    ):
        yield client


@contextlib.contextmanager
def _private_dockerd(runtimes: dict[str, dict[str, object]], image: str) -> Iterator[Docker]:
    import fcntl
    import signal
    import time

    # One private dockerd at a time on this host: they would share the bridge's name and subnet.
    lock = open("/run/lock/bonneville-test-dockerd.lock", "w")  # noqa: SIM115
    fcntl.flock(lock, fcntl.LOCK_EX)
    # Short paths: containerd and the shims put unix sockets under the exec root.
    base = Path(tempfile.mkdtemp(prefix="bvd-", dir="/tmp"))
    sock = base / "docker.sock"
    bridge = DOCKER_BRIDGE
    # Our own bridge (not docker0): created here, deleted afterwards, nothing else touched.
    subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False)  # a stale one
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    subprocess.run(["ip", "addr", "add", DOCKER_BRIDGE_ADDRESS, "dev", bridge], check=True)
    subprocess.run(["ip", "link", "set", bridge, "up"], check=True)
    log = open(base / "dockerd.log", "wb")  # noqa: SIM115
    (base / "daemon.json").write_text(json.dumps({"runtimes": runtimes}))
    daemon = subprocess.Popen(
        [
            "dockerd",
            "--data-root",
            str(base / "data"),
            "--exec-root",
            str(base / "exec"),
            "--host",
            f"unix://{sock}",
            "--pidfile",
            str(base / "dockerd.pid"),
            "--config-file",
            str(base / "daemon.json"),
            f"--bridge={bridge}",
            # No iptables rules left on the host afterwards.
            "--iptables=false",
            "--ip-masq=false",
        ],
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    client = Docker(str(sock))
    try:
        deadline = time.monotonic() + 60
        while client("version").returncode != 0:
            assert daemon.poll() is None, (base / "dockerd.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "dockerd did not come up"
            time.sleep(0.2)
        rootfs = make_busybox_rootfs(base / "rootfs")
        tar = subprocess.run(["tar", "-C", str(rootfs), "-c", "."], capture_output=True, check=True)
        client.ok("import", "-", image, input=tar.stdout)
        yield client
    finally:
        ids = client("ps", "-aq").stdout.split()
        if ids:
            client("rm", "-f", *[i.decode() for i in ids])
        stop_daemon(daemon, base)
        log.close()
        # containerd's shims outlive their daemon by design (live restore); these are the
        # private daemon's own, so they go with it. Our monitors and VMs must already be gone.
        for line in leftover_processes(str(base)):
            pid, _, command = line.partition(": ")
            # (gVisor's sandbox and gofer, when the benchmarks compare with runsc, likewise.)
            if "containerd-shim" in command or command.startswith("runsc-"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)
        subprocess.run(["ip", "link", "del", bridge], check=False)
        lock.close()
    assert leftover_processes(str(base)) == []


def modules_imported_by(probe: str, *args: str) -> set[str]:
    """The modules a fresh Python holds after ``probe`` (which prints sorted(sys.modules))."""
    out = subprocess.run(
        [sys.executable, "-c", probe, *args],
        capture_output=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(CHECKOUT)},
    ).stdout
    return set(json.loads(out))

"""Docker workflows with `--runtime bonneville`, against a private dockerd the tests start.

dockerd (Debian's docker.io) runs with its own data-root, exec-root and socket, so nothing
touches a system daemon; the image is a busybox rootfs imported from a local tar.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.backends import BACKENDS, URIS, use_backend
from tests.support import Docker, host_links_of_ours, network_bridge_option, private_dockerd

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(shutil.which("dockerd") is None, reason="dockerd is not installed"),
]

IMAGE = "bonneville-busybox:test"


def runtime_name(backend: str) -> str:
    return "bonneville" if backend == "qemu" else f"bonneville-{backend}"


@pytest.fixture(params=BACKENDS)
def docker(
    request: pytest.FixtureRequest, dockerd: Docker, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Docker]:
    """The shared dockerd, with containers run by the runtime of one backend."""
    use_backend(request, monkeypatch)
    yield Docker(dockerd.socket_path, runtime_name(str(request.param)))
    # Each case removes its containers: the host-side links of libvirtd's VMs went with them
    # (checked per case, so a leak names the case that made it).
    assert host_links_of_ours() == []


@pytest.fixture(scope="module")
def dockerd() -> Iterator[Docker]:
    # One runtime per backend, told apart by their runtimeArgs (global flags, as runc's).
    bonneville = shutil.which("bonneville")
    assert bonneville
    runtimes: dict[str, dict[str, object]] = {}
    for backend in BACKENDS:
        runtimes[runtime_name(backend)] = {"path": bonneville}
        if backend in URIS:
            args = ["--backend", "libvirt", "--libvirt-uri", URIS[backend]]
            runtimes[runtime_name(backend)]["runtimeArgs"] = args
    with private_dockerd(runtimes, IMAGE) as client:
        yield client
    # The host-side veths and taps of libvirtd's VMs went with their containers.
    assert host_links_of_ours() == []


def test_run_echo_uses_a_vm(docker: Docker) -> None:
    result = docker.run(IMAGE, "uname", "-r")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() != os.uname().release


def test_exit_codes_and_stderr(docker: Docker) -> None:
    result = docker.run(IMAGE, "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (result.returncode, result.stdout, result.stderr) == (7, b"out\n", b"err\n")


def test_interactive_stdin(docker: Docker) -> None:
    result = docker.run("-i", IMAGE, "tr", "a-z", "A-Z", input=b"piped through a vm\n")
    assert result.stdout == b"PIPED THROUGH A VM\n"


def test_tty_and_window_size(docker: Docker) -> None:
    import pexpect

    child = pexpect.spawn(
        "docker",
        ["run", "--rm", "-it", "--runtime", docker.runtime, IMAGE, "sh"],
        env=docker.env,
        timeout=120,
    )
    child.setwinsize(40, 120)
    child.expect(r"[#$] ")
    child.sendline("tty; stty size; exit 5")
    child.expect(pexpect.EOF)
    child.close()
    assert b"/dev/pts/" in child.before and b"40 120" in child.before
    assert child.exitstatus == 5


def test_detached_logs_signals_stop_restart(docker: Docker) -> None:
    script = (
        "echo started; trap 'echo usr1' USR1; trap 'echo term; exit 0' TERM;"
        " while true; do sleep 0.1; done"
    )
    cid = docker.ok("run", "-d", "--runtime", docker.runtime, IMAGE, "sh", "-c", script).strip()
    try:
        wait_log(docker, cid, "started")
        docker.ok("kill", "-s", "USR1", cid)
        wait_log(docker, cid, "usr1")
        docker.ok("pause", cid)
        assert docker.ok("inspect", "-f", "{{.State.Status}}", cid).strip() == "paused"
        docker.ok("unpause", cid)
        docker.ok("stop", "-t", "30", cid)
        wait_log(docker, cid, "term")
        assert docker.ok("inspect", "-f", "{{.State.ExitCode}}", cid).strip() == "0"
        docker.ok("restart", "-t", "1", cid)
        assert docker.ok("exec", cid, "echo", "again").strip() == "again"
        docker.ok("kill", cid)
        assert docker.ok("wait", cid).strip() == "137"
    finally:
        docker("rm", "-f", cid)


def test_stop_escalates_to_sigkill(docker: Docker) -> None:
    cid = docker.ok(
        "run",
        "-d",
        "--runtime",
        docker.runtime,
        IMAGE,
        "sh",
        "-c",
        "trap '' TERM; echo ready; while true; do sleep 0.1; done",
    ).strip()
    try:
        wait_log(docker, cid, "ready")
        docker.ok("stop", "-t", "1", cid)
        assert docker.ok("inspect", "-f", "{{.State.ExitCode}}", cid).strip() == "137"
    finally:
        docker("rm", "-f", cid)


def test_oom_kill_is_reported_as_runc_reports_it(docker: Docker) -> None:
    """docker inspect's OOMKilled: dockerd learns it from the container's host cgroup, where the
    monitor has the host kernel count the OOM kill the guest's kernel made."""
    cid = docker.ok(
        "run", "-d", "--runtime", docker.runtime, "-m", "16m", "--memory-swap", "16m",
        IMAGE, "dd", "if=/dev/zero", "of=/dev/null", "bs=32M",
    ).strip()  # fmt: skip
    try:
        assert docker.ok("wait", cid).strip() == "137"
        state = docker.ok("inspect", "-f", "{{.State.ExitCode}} {{.State.OOMKilled}}", cid)
        assert state.split() == ["137", "true"]
    finally:
        docker("rm", "-f", cid)
    cid = docker.ok("run", "-d", "--runtime", docker.runtime, IMAGE, "sh", "-c", "exit 3").strip()
    try:
        assert docker.ok("wait", cid).strip() == "3"
        state = docker.ok("inspect", "-f", "{{.State.ExitCode}} {{.State.OOMKilled}}", cid)
        assert state.split() == ["3", "false"]
    finally:
        docker("rm", "-f", cid)


def test_exec_variants_and_top(docker: Docker) -> None:
    cid = docker.ok("run", "-d", "--runtime", docker.runtime, IMAGE, "sleep", "1000").strip()
    try:
        result = docker("exec", cid, "sh", "-c", "echo in; echo err >&2; exit 4")
        assert (result.returncode, result.stdout, result.stderr) == (4, b"in\n", b"err\n")
        piped = docker("exec", "-i", cid, "tr", "a-z", "A-Z", input=b"abc\n")
        assert piped.stdout == b"ABC\n"
        who = docker.ok(
            "exec",
            "-u",
            "65534:65534",
            "-w",
            "/tmp",
            "-e",
            "X=42",
            cid,
            "sh",
            "-c",
            "id -u; pwd; echo $X",
        )
        assert who == "65534\n/tmp\n42\n"
        top = docker.ok("top", cid)
        assert "PID" in top.splitlines()[0] and len(top.splitlines()) >= 2
        # docker update → containerd → `bonneville update --resources -` → the guest's cgroup.
        docker.ok("update", "--pids-limit", "9", "--memory", "100m", "--memory-swap", "-1", cid)
        limits = docker.ok(
            "exec", cid, "cat", "/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/memory.max"
        )
        assert limits.split() == ["9", str(100 * 1024 * 1024)]
        refused = docker("update", "--cpuset-cpus", "0", cid)
        assert refused.returncode != 0
        assert b"cannot update cpu.cpus: a VM cannot honour it" in refused.stderr, refused.stderr
    finally:
        docker("rm", "-f", cid)


def test_exec_with_tty(docker: Docker) -> None:
    import pexpect

    cid = docker.ok("run", "-d", "--runtime", docker.runtime, IMAGE, "sleep", "1000").strip()
    try:
        child = pexpect.spawn(
            "docker", ["exec", "-it", cid, "sh", "-c", "tty; exit 3"], env=docker.env, timeout=120
        )
        child.expect(pexpect.EOF)
        child.close()
        assert b"/dev/pts/" in child.before and child.exitstatus == 3
    finally:
        docker("rm", "-f", cid)


def test_config_options_reach_the_vm(docker: Docker, tmp_path: Path) -> None:
    host_dir = tmp_path / "vol"
    host_dir.mkdir()
    host_dir.chmod(0o777)  # the container writes as uid 1000
    (host_dir / "in").write_text("host data\n")
    ro_dir = tmp_path / "ro"
    ro_dir.mkdir()
    script = (
        "id -u; id -g; pwd; echo $FOO; hostname; cat /data/in; echo written > /data/out;"
        " echo x > /ro/x 2>/dev/null || echo ro-refused;"
        " echo x > /etc/x 2>/dev/null || echo root-ro; echo t > /scratch/t && echo tmpfs-ok;"
        " grep MemTotal /proc/meminfo; nproc"
    )
    result = docker.run(
        "-u",
        "1000:1000",
        "-w",
        "/tmp",
        "-e",
        "FOO=bar",
        "--hostname",
        "vmhost",
        "--read-only",
        "--tmpfs",
        "/scratch",
        "-v",
        f"{host_dir}:/data",
        "-v",
        f"{ro_dir}:/ro:ro",
        "--memory",
        "400m",
        "--cpus",
        "2",
        IMAGE,
        "sh",
        "-c",
        script,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[:10] == [
        "1000",
        "1000",
        "/tmp",
        "bar",
        "vmhost",
        "host data",
        "ro-refused",
        "root-ro",
        "tmpfs-ok",
        lines[9],
    ]
    # More than the default 256 MiB VM, at most the limit (the kernel keeps some for itself).
    assert 300 * 1024 < int(lines[9].split()[1]) <= 400 * 1024
    assert lines[10] == str(min(2, os.cpu_count() or 1))
    assert (host_dir / "out").exists(), result.stdout + result.stderr
    assert (host_dir / "out").read_text() == "written\n"
    assert not (ro_dir / "x").exists()


def test_named_volume_persists(docker: Docker) -> None:
    docker.ok("volume", "create", "bvol")
    try:
        docker.ok(
            "run",
            "--rm",
            "--runtime",
            docker.runtime,
            "-v",
            "bvol:/v",
            IMAGE,
            "sh",
            "-c",
            "echo kept > /v/f",
        )
        out = docker.ok(
            "run", "--rm", "--runtime", docker.runtime, "-v", "bvol:/v", IMAGE, "cat", "/v/f"
        )
        assert out == "kept\n"
    finally:
        docker("volume", "rm", "bvol")


def test_runtime_errors_reach_docker(docker: Docker) -> None:
    result = docker.run(IMAGE, "/no/such/binary")
    assert result.returncode != 0
    assert b"/no/such/binary" in result.stderr


def test_networking_bridge_ports_and_peers(docker: Docker) -> None:
    server = docker.ok(
        "run",
        "-d",
        "--runtime",
        docker.runtime,
        "-p",
        "127.0.0.1:18080:8080",
        IMAGE,
        "sh",
        "-c",
        "mkdir -p /www && echo hello-from-vm > /www/index.html && httpd -f -p 8080 -h /www",
    ).strip()
    try:
        ip = docker.ok("inspect", "-f", "{{.NetworkSettings.IPAddress}}", server).strip()
        # The guest owns the container's address: its NIC has the veth's MAC, IP and routes.
        # IPv6 as dockerd leaves it to runc's containers (off, on this IPv4-only network).
        probe = "cat /proc/sys/net/ipv6/conf/*/disable_ipv6 /proc/net/if_inet6"
        ours = docker.run(IMAGE, "sh", "-c", probe)
        theirs = docker("run", "--rm", "--runtime", "runc", IMAGE, "sh", "-c", probe)
        assert (ours.returncode, ours.stdout) == (0, theirs.stdout), (ours, theirs)
        shown = docker.run(IMAGE, "sh", "-c", "ip -4 -o addr show eth0; ip route")
        assert b"inet 172.31.250." in shown.stdout, shown
        assert b"default via 172.31.250.1" in shown.stdout, shown
        peer = wait_output(docker, IMAGE, "wget", "-qO-", f"http://{ip}:8080/")
        assert peer == "hello-from-vm\n"
        # From the host, through docker-proxy on the published port.
        reply = http_get("127.0.0.1", 18080)
        assert reply.endswith(b"hello-from-vm\n"), reply
        # --network container: runs the new container inside the server's VM (one kernel, one
        # network stack): it reaches the server on localhost, as under runc.
        joined = docker.run(
            "--network",
            f"container:{server}",
            IMAGE,
            "sh",
            "-c",
            "wget -qO- http://127.0.0.1:8080/; cat /proc/sys/kernel/random/boot_id",
        )
        assert joined.returncode == 0, joined
        served, boot_id = joined.stdout.decode().splitlines()
        assert served == "hello-from-vm"
        in_server = docker.ok("exec", server, "cat", "/proc/sys/kernel/random/boot_id").strip()
        assert boot_id == in_server, "the joined container runs in the server's VM"
        # It has left the VM: the server goes on serving.
        assert http_get("127.0.0.1", 18080).endswith(b"hello-from-vm\n")
    finally:
        docker("rm", "-f", server)


def test_user_network_peers(docker: Docker) -> None:
    docker.ok("network", "create", *network_bridge_option("bnet"), "bnet")
    server = ""
    try:
        server = docker.ok(
            "run",
            "-d",
            "--runtime",
            docker.runtime,
            "--network",
            "bnet",
            "--name",
            "srv",
            "--network-alias",
            "web",
            IMAGE,
            "sh",
            "-c",
            "echo peer > /p && httpd -f -p 80 -h /",
        ).strip()
        ip = docker.ok(
            "inspect", "-f", '{{(index .NetworkSettings.Networks "bnet").IPAddress}}', server
        ).strip()
        assert (
            wait_output(docker, "--network", "bnet", IMAGE, "wget", "-qO-", f"http://{ip}/p")
            == "peer\n"
        )
        # Names and aliases resolve through docker's embedded resolver (127.0.0.11 in the
        # container's namespace, relayed from the guest), over UDP and TCP, as under runc.
        script = (
            "cat /etc/resolv.conf | grep -q 127.0.0.11 &&"
            " nslookup srv 127.0.0.11 | tail -n +3 && nslookup web | tail -n +3 &&"
            " ping -c 1 -W 5 srv >/dev/null && wget -qO- http://web/p"
        )
        resolved = docker.run("--network", "bnet", IMAGE, "sh", "-c", script)
        assert resolved.returncode == 0, resolved
        text = resolved.stdout.decode()
        assert text.count(ip) == 2 and text.endswith("peer\n"), text
    finally:
        if server:
            docker("rm", "-f", server)
        docker("network", "rm", "bnet")


def test_ipv6_network_gets_a_link_local_address_from_the_containers_mac(docker: Docker) -> None:
    """Not the template's: every clone starts with its template's MAC (and IPv6 off). And the
    address dockerd gave the veth, usable at once (no DAD, as dockerd adds it), with the
    default route: the bridge answers a ping over IPv6."""
    docker.ok(
        "network", "create", *network_bridge_option("bnet6"), "--ipv6", "--subnet", "fd00:b0::/64",
        "bnet6",
    )  # fmt: skip
    try:
        shown = docker.run(
            "--network",
            "bnet6",
            IMAGE,
            "sh",
            "-c",
            "cat /sys/class/net/eth0/address /proc/net/if_inet6;"
            " ping -6 -c 1 -W 30 fd00:b0::1 >/dev/null && echo pinged",
        )
        assert shown.returncode == 0, shown
        mac, *rows, pinged = shown.stdout.decode().splitlines()
        octets = bytes.fromhex(mac.replace(":", ""))
        eui64 = bytes([octets[0] ^ 2, *octets[1:3], 0xFF, 0xFE, *octets[3:]])
        link_local = "fe80000000000000" + eui64.hex()
        eth0 = {row.split()[0]: row.split() for row in rows if row.split()[-1] == "eth0"}
        assert link_local in eth0, rows
        # fd00:b0::/64's address, flags IFA_F_NODAD|IFA_F_PERMANENT and not tentative.
        (address,) = [row for key, row in eth0.items() if key.startswith("fd0000b0")]
        assert int(address[4], 16) == 0x82, rows
        assert pinged == "pinged"
    finally:
        docker("network", "rm", "bnet6")


def test_network_none(docker: Docker) -> None:
    links = docker.run("--network", "none", IMAGE, "sh", "-c", "ip -o link | wc -l")
    assert links.stdout.strip() == b"1"  # only lo


def test_network_host_publishes_ports_and_reaches_the_host(docker: Docker) -> None:
    """--network host: the guest's listening ports appear on the host as they open and go
    as they close; the container reaches the host's networks (its loopback at 10.0.2.2)."""
    port = _free_port()
    with _host_server(b"from-the-host\n") as host_port:
        server = docker.ok(
            "run",
            "-d",
            "--runtime",
            docker.runtime,
            "--network",
            "host",
            IMAGE,
            "sh",
            "-c",
            f"wget -qO- http://10.0.2.2:{host_port}/ > /reached;"
            f" mkdir -p /www && echo hello-host-net > /www/index.html;"
            # httpd in the background: PID 1 of the container would ignore killall's TERM.
            f" httpd -p {port} -h /www; exec sleep 1000",
        ).strip()
        try:
            assert http_get("127.0.0.1", port).endswith(b"hello-host-net\n")
            reached = docker.ok("exec", server, "cat", "/reached")
            assert reached == "from-the-host\n"
            docker.ok("exec", server, "killall", "httpd")
            deadline = time.monotonic() + 30
            while _port_open(port):  # withdrawn once the guest's socket closed
                assert time.monotonic() < deadline, f"port {port} still open on the host"
                time.sleep(0.2)
        finally:
            docker("rm", "-f", server)
    assert not _port_open(port)


def test_a_hosts_loopback_service_stays_out_of_reach(docker: Docker) -> None:
    """Host safety: a container on a user network (with the DNS relay) reaches no service bound
    to the host's loopback: not through the user-mode stack's host address (it has no such NIC),
    not through its gateway (the host's side of the bridge), not through docker's resolver
    address (the relay carries DNS messages to port 53 only)."""
    docker.ok("network", "create", *network_bridge_option("bsafe"), "bsafe")
    try:
        with _host_server(b"secret\n") as port:
            gateway = docker.ok(
                "network", "inspect", "-f", "{{(index .IPAM.Config 0).Gateway}}", "bsafe"
            ).strip()
            probe = " ; ".join(
                f"wget -T 5 -qO- http://{host}:{port}/ && echo REACHED {host}"
                for host in ("10.0.2.2", gateway, "127.0.0.11", "127.0.0.1")
            )
            result = docker.run("--network", "bsafe", IMAGE, "sh", "-c", probe + "; echo done")
            assert result.stdout.decode().strip().splitlines()[-1] == "done", result
            assert b"REACHED" not in result.stdout and b"secret" not in result.stdout, result
    finally:
        docker("network", "rm", "bsafe")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def _host_server(body: bytes) -> Iterator[int]:
    """An HTTP server on the host's loopback only, for the test's lifetime; its port."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def http_get(host: str, port: int, timeout: float = 120) -> bytes:
    """GET / with a plain socket (no proxy settings apply); retried while the VM boots."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            with socket.create_connection((host, port), timeout=10) as conn:
                conn.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
            if data.startswith(b"HTTP/1"):
                return data
            last = repr(data)
        except OSError as exc:
            last = repr(exc)
        assert time.monotonic() < deadline, f"the published port never answered: {last}"
        time.sleep(0.5)


def wait_output(docker: Docker, *args: str, timeout: float = 120) -> str:
    """`docker run` until it succeeds (the server VM may still be booting); its output."""
    deadline = time.monotonic() + timeout
    while True:
        result = docker.run(*args)
        if result.returncode == 0:
            return result.stdout.decode()
        assert time.monotonic() < deadline, result.stderr
        time.sleep(0.5)


def wait_log(docker: Docker, cid: str, text: str, timeout: float = 120) -> None:
    """Poll `docker logs` for a line the container prints; a hang guard only."""
    deadline = time.monotonic() + timeout
    while text not in docker.ok("logs", cid):
        assert time.monotonic() < deadline, f"{text!r} never appeared in the logs of {cid}"
        time.sleep(0.2)

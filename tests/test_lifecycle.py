"""The runc-compatible lifecycle through the real CLI.

Here with the fake backend (the real agent as a host process: seconds, no VM); the same cases
run against real QEMU VMs in integration/test_lifecycle.py, which overrides `backend_name`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bonneville.backends import procfs
from tests.support import Runtime, default_config, write_bundle


def make_bundle(tmp_path: Path, args: list[str], name: str = "bundle", **changes: object) -> Path:
    config = default_config(args)
    config.update(changes)
    return write_bundle(tmp_path / name, config)


def wait_status(rt: Runtime, cid: str, wanted: str, timeout: float = 60) -> dict[str, object]:
    """Poll `state` (as runtime-tools does) until the status is reached; a hang guard only."""
    deadline = time.monotonic() + timeout
    while True:
        st = rt.state(cid)
        if st["status"] == wanted or time.monotonic() > deadline:
            return st
        time.sleep(0.1)


def wait_for(condition: Callable[[], bool], timeout: float = 60) -> None:
    """Poll a host-side condition (a file the container writes) until it holds; the timeout
    is a hang guard, and reaching it fails the test."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"still not so after {timeout} s: {condition}"
        time.sleep(0.05)


def test_run_prints_output_and_exits_with_status(runtime: Runtime, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, ["sh", "-c", "echo hello; echo oops >&2; exit 7"])
    result = runtime("run", "--bundle", str(bundle), "c1")
    assert result.stdout == b"hello\n"
    assert result.stderr == b"oops\n"
    assert result.returncode == 7
    # run deletes the container afterwards, like runc.
    assert runtime("state", "c1").returncode == 1


def test_stdin_piped_into_run_reaches_the_container(runtime: Runtime, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, ["sh", "-c", "tr a-z A-Z"])
    result = runtime("run", "--bundle", str(bundle), "c1", input=b"piped input\n")
    assert result.stdout == b"PIPED INPUT\n"
    assert result.returncode == 0


def test_full_lifecycle(runtime: Runtime, tmp_path: Path) -> None:
    # The process is PID 1 of its PID namespace, as under runc: TERM reaches it only through a
    # handler of its own.
    bundle = make_bundle(
        tmp_path,
        ["sh", "-c", "trap 'exit 143' TERM; echo started > /tmp/marker; sleep 1000 & wait"],
    )
    pid_file = tmp_path / "init.pid"
    runtime("create", "--bundle", str(bundle), "--pid-file", str(pid_file), "c1", check=True)
    st = runtime.state("c1")
    assert st["status"] == "created"
    pid_text = pid_file.read_text()
    assert pid_text.isdigit(), "the pid file holds digits only, no newline"
    assert st["pid"] == int(pid_text) and os.path.exists(f"/proc/{pid_text}")
    assert st["bundle"] == str(bundle) and st["id"] == "c1" and st["ociVersion"]
    runtime("start", "c1", check=True)
    assert runtime.state("c1")["status"] == "running"
    marker = bundle / "rootfs" / "tmp" / "marker"
    wait_for(marker.exists)
    start_again = runtime("start", "c1")
    assert start_again.returncode == 1 and b"running" in start_again.stderr
    runtime("kill", "c1", "TERM", check=True)
    st = wait_status(runtime, "c1", "stopped")
    assert st["status"] == "stopped"
    assert marker.read_text() == "started\n"
    not_running = runtime("kill", "c1", "KILL")
    assert not_running.returncode == 1 and b"container not running" in not_running.stderr
    runtime("delete", "c1", check=True)
    assert not (runtime.root / "c1").exists()
    assert runtime("state", "c1").stderr.strip() == b"bonneville: container c1 does not exist"


def test_monitor_exits_with_the_container_status(runtime: Runtime, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, ["sleep", "1000"])
    pid_file = tmp_path / "pid"
    runtime("create", "-b", str(bundle), "--pid-file", str(pid_file), "c1", check=True)
    runtime("start", "c1", check=True)
    runtime("kill", "c1", "9", check=True)
    assert wait_status(runtime, "c1", "stopped")["status"] == "stopped"
    runtime("delete", "c1", check=True)


def test_the_monitor_does_not_carry_the_schema_validator(runtime: Runtime, tmp_path: Path) -> None:
    """create validates config.json in a throwaway child: the monitor, forked from create and
    living as long as the container, never maps jsonschema's native helper (rpds)."""
    bundle = make_bundle(tmp_path, ["sleep", "100"])
    runtime("create", "--bundle", str(bundle), "c1", check=True)
    monitor = int(runtime.state("c1")["pid"])  # type: ignore[call-overload]
    maps = Path(f"/proc/{monitor}/maps").read_text()
    assert "/rpds" not in maps
    assert "python" in maps  # it is the Python monitor we looked at


def test_a_start_that_cannot_run_the_process_stops_the_container(
    runtime: Runtime, tmp_path: Path
) -> None:
    """As runc's: `start` fails with the reason (one line), the container is stopped (not left
    created), and delete without --force removes it."""
    bundle = make_bundle(tmp_path, ["/no/such/binary"])
    runtime("create", "-b", str(bundle), "c1", check=True)
    result = runtime("start", "c1")
    assert result.returncode == 1 and b"/no/such/binary" in result.stderr
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bonneville: "), lines
    assert runtime.state("c1")["status"] == "stopped"
    runtime("delete", "c1", check=True)
    assert not (runtime.root / "c1").exists()


# execve(2)'s limits (fs/exec.c): 128 KiB per string; all of argv and envp at most a quarter of
# RLIMIT_STACK, which the big-process cases set to 8 MiB (2 MiB for both) so the host's own
# stack limit (fake backend) cannot change the verdict.
STACK_8_MIB = {"type": "RLIMIT_STACK", "hard": 8 << 20, "soft": 8 << 20}


def big_process_bundle(tmp_path: Path, args: list[str], env: list[str]) -> Path:
    config = default_config(args)
    process = config["process"]
    assert isinstance(process, dict)
    process["env"] = [*process["env"], *env]
    process["rlimits"] = [*process.get("rlimits", []), STACK_8_MIB]
    return write_bundle(tmp_path / "bundle", config)


def strings(name: str, count: int, size: int) -> list[str]:
    return [f"{name}{i}=" + "x" * size for i in range(count)]


def test_a_2_mb_environment_reaches_the_process(runtime: Runtime, tmp_path: Path) -> None:
    """What execve takes reaches the process, as under runc: 2 MB of environment (20 strings
    of 100 kB), carried to the VM in the create request."""
    bundle = big_process_bundle(
        tmp_path,
        ["sh", "-c", "echo ${#BIG0} ${#BIG19}; env | grep -c ^BIG"],
        strings("BIG", 20, 100_000),
    )
    result = runtime("run", "-b", str(bundle), "c1")
    assert (result.returncode, result.stdout) == (0, b"100000 100000\n20\n"), result.stderr


BIG_PROCESSES = {
    # args, env, what the one line says after "argument list too long"
    "an env string over 128 KiB": (
        ["true"],
        ["HUGE=" + "x" * 200_000],
        "process.env entry HUGE is 195.3 KiB; the kernel accepts at most 128.0 KiB per string",
    ),
    "an argument over 128 KiB": (
        ["sh", "-c", "true", "x" * 200_000],
        [],
        "process.args[3] is 195.3 KiB; the kernel accepts at most 128.0 KiB per string",
    ),
    "3 MB of env in all": (
        ["true"],
        strings("BIG", 30, 100_000),
        "process.env is 2.9 MiB, process.args 13 bytes; the kernel accepts at most 2.0 MiB for"
        " both, a quarter of RLIMIT_STACK, 8.0 MiB",
    ),
}


@pytest.mark.parametrize("case", sorted(BIG_PROCESSES))
def test_a_process_execve_refuses_fails_start_in_one_line(
    runtime: Runtime, tmp_path: Path, case: str
) -> None:
    """As runc's: create takes it, start fails with execve's E2BIG (named in config.json's
    terms), the container is stopped, and delete leaves nothing."""
    args, env, why = BIG_PROCESSES[case]
    bundle = big_process_bundle(tmp_path, args, env)
    runtime("create", "-b", str(bundle), "c1", check=True)
    result = runtime("start", "c1")
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 1 and len(lines) == 1, lines
    assert lines[0].startswith("bonneville: exec ") and lines[0].endswith(
        f": argument list too long ({why})"
    ), lines
    assert runtime.state("c1")["status"] == "stopped"
    runtime("delete", "c1", check=True)
    assert not (runtime.root / "c1").exists()


def test_a_process_no_kernel_can_run_fails_create(runtime: Runtime, tmp_path: Path) -> None:
    """Over 6 MiB of argv and environment no execve takes, whatever the stack limit: create
    refuses it in one line naming the field, and leaves nothing behind."""
    bundle = big_process_bundle(tmp_path, ["true"], strings("BIG", 70, 100_000))
    result = runtime("create", "-b", str(bundle), "c1")
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        f"bonneville: {bundle / 'config.json'}: process.env is 6.7 MiB; the kernel accepts at"
        " most 6.0 MiB of a process's arguments and environment"
    ]
    assert not (runtime.root / "c1").exists()


def test_delete_of_created_container_kills_it(runtime: Runtime, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, ["sleep", "1000"])
    runtime("create", "-b", str(bundle), "c1", check=True)
    pid = int(runtime.state("c1")["pid"])  # type: ignore[call-overload]
    runtime("delete", "c1", check=True)
    assert not procfs.is_alive(pid, None)
    assert not (runtime.root / "c1").exists()


def test_delete_of_running_container_needs_force(runtime: Runtime, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, ["sleep", "1000"])
    runtime("create", "-b", str(bundle), "c1", check=True)
    runtime("start", "c1", check=True)
    refused = runtime("delete", "c1")
    assert refused.returncode == 1 and b"not stopped: running" in refused.stderr
    runtime("delete", "--force", "c1", check=True)
    assert not (runtime.root / "c1").exists()


def test_kill_of_created_container_stops_it(runtime: Runtime, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, ["sleep", "1000"])
    runtime("create", "-b", str(bundle), "c1", check=True)
    runtime("kill", "c1", "SIGKILL", check=True)
    assert wait_status(runtime, "c1", "stopped")["status"] == "stopped"
    runtime("delete", "c1", check=True)


def test_delete_force_of_unknown_id_succeeds(runtime: Runtime) -> None:
    assert runtime("delete", "--force", "nothing-here").returncode == 0


@pytest.mark.parametrize(
    "command",
    [["state"], ["kill"], ["delete"], ["start"], ["update", "--pids-limit", "5"], ["events"]],
)
def test_unknown_id(runtime: Runtime, command: list[str]) -> None:
    result = runtime(*command, "ghost")
    assert result.returncode == 1
    assert result.stderr.strip() == b"bonneville: container ghost does not exist"


def test_bind_mount_and_hostname(runtime: Runtime, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "in.txt").write_text("from host\n")
    ro = tmp_path / "ro"
    ro.mkdir()
    config = default_config(
        [
            "sh",
            "-c",
            "cat /data/in.txt; echo from guest > /data/out.txt; hostname;"
            " echo x > /ro/f || echo ro-refused",
        ]
    )
    mounts = config["mounts"]
    assert isinstance(mounts, list)
    mounts.append(
        {"destination": "/data", "type": "bind", "source": str(shared), "options": ["rbind", "rw"]}
    )
    mounts.append(
        {"destination": "/ro", "type": "bind", "source": str(ro), "options": ["bind", "ro"]}
    )
    config["hostname"] = "boxy"
    bundle = write_bundle(tmp_path / "bundle", config)
    result = runtime("run", "-b", str(bundle), "c1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:3] == [b"from host", b"boxy", b"ro-refused"]
    assert (shared / "out.txt").read_text() == "from guest\n"
    assert not (ro / "f").exists()
    # The bind mounts lived in the monitor's private mount namespace only.
    assert str(runtime.root) not in Path("/proc/self/mountinfo").read_text()


def test_hooks_get_state_on_stdin(runtime: Runtime, tmp_path: Path) -> None:
    out = tmp_path / "hooks"
    out.mkdir()
    script = tmp_path / "hook.sh"
    script.write_text(f"#!/bin/sh\ncat > {out}/$1.json\n")
    script.chmod(0o755)
    hooks = {
        kind: [{"path": str(script), "args": ["hook.sh", kind]}]
        for kind in (
            "prestart",
            "createRuntime",
            "createContainer",
            "startContainer",
            "poststart",
            "poststop",
        )
    }
    bundle = make_bundle(tmp_path, ["true"], hooks=hooks)
    runtime("create", "-b", str(bundle), "c1", check=True)
    pid = runtime.state("c1")["pid"]
    # Like runc, the later commands run the hooks config.json had at create: it may go.
    (bundle / "config.json").unlink()
    runtime("start", "c1", check=True)
    wait_status(runtime, "c1", "stopped")
    runtime("delete", "c1", check=True)
    for kind in hooks:
        data = json.loads((out / f"{kind}.json").read_text())
        assert data["id"] == "c1" and data["pid"] == pid, kind
        assert data["bundle"] == str(bundle)


def test_failing_prestart_hook_leaves_nothing(runtime: Runtime, tmp_path: Path) -> None:
    hooks = {"prestart": [{"path": "/bin/false"}]}
    bundle = make_bundle(tmp_path, ["true"], hooks=hooks)
    result = runtime("create", "-b", str(bundle), "c1")
    assert result.returncode == 1
    assert b"prestart hook" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (runtime.root / "c1").exists()


def test_list_formats(runtime: Runtime, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, ["sleep", "1000"])
    runtime("create", "-b", str(bundle), "c1", check=True)
    listed = json.loads(runtime("list", "--format", "json", check=True).stdout)
    assert [(c["id"], c["status"]) for c in listed] == [("c1", "created")]
    assert runtime("list", "-q", check=True).stdout == b"c1\n"
    table = runtime("list", check=True).stdout.decode().splitlines()
    assert table[0].split()[:3] == ["ID", "PID", "STATUS"] and table[1].startswith("c1 ")
    runtime("delete", "c1", check=True)


def test_json_log_carries_the_error(runtime: Runtime, tmp_path: Path) -> None:
    log = tmp_path / "log.json"
    result = subprocess.run(
        [
            "bonneville",
            "--root",
            str(runtime.root),
            "--log",
            str(log),
            "--log-format",
            "json",
            "kill",
            "ghost",
            "9",
        ],
        capture_output=True,
        check=False,
    )
    assert result.returncode == 1
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert entries[-1]["level"] == "error"
    assert entries[-1]["msg"] == "container ghost does not exist"
    assert "time" in entries[-1]


def test_console_socket_receives_a_pty(runtime: Runtime, tmp_path: Path) -> None:
    config = default_config(["sh", "-c", "tty; stty size"], terminal=True)
    process = config["process"]
    assert isinstance(process, dict)
    process["consoleSize"] = {"height": 33, "width": 101}
    bundle = write_bundle(tmp_path / "bundle", config)
    sock_path = tmp_path / "console.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock_path))
    server.listen(1)
    try:
        create = subprocess.Popen(
            runtime.argv("create", "-b", str(bundle), "--console-socket", str(sock_path), "c1")
        )
        conn, _ = server.accept()
        _, fds, _, _ = socket.recv_fds(conn, 1024, 1)
        conn.close()
        assert create.wait(timeout=180) == 0
        master = fds[0]
        runtime("start", "c1", check=True)
        output = b""
        deadline = time.monotonic() + 60
        while b"101" not in output and time.monotonic() < deadline:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            output += chunk
        os.close(master)
        assert b"/dev/pts/" in output
        assert b"33 101" in output
    finally:
        server.close()
    wait_status(runtime, "c1", "stopped")
    runtime("delete", "c1", check=True)


def test_signal_forwarded_to_monitor_pid(runtime: Runtime, tmp_path: Path) -> None:
    bundle = make_bundle(
        tmp_path,
        [
            "sh",
            "-c",
            "trap 'echo got-usr1 > /tmp/sig; exit 3' USR1; : > /tmp/trap-set;"
            " while true; do sleep 0.1; done",
        ],
    )
    runtime("create", "-b", str(bundle), "c1", check=True)
    runtime("start", "c1", check=True)
    pid = int(runtime.state("c1")["pid"])  # type: ignore[call-overload]
    wait_for((bundle / "rootfs" / "tmp" / "trap-set").exists)
    os.kill(pid, signal.SIGUSR1)
    assert wait_status(runtime, "c1", "stopped")["status"] == "stopped"
    assert (bundle / "rootfs" / "tmp" / "sig").read_text() == "got-usr1\n"
    runtime("delete", "c1", check=True)


BAD_INPUTS = {
    "missing config": lambda b: (b / "config.json").unlink(),
    "malformed config": lambda b: (b / "config.json").write_text("{nope"),
    "schema violation": lambda b: (b / "config.json").write_text(
        json.dumps({"ociVersion": "1.0.0", "root": {"path": 5}})
    ),
    "bad ociVersion": lambda b: (b / "config.json").write_text(
        json.dumps({**json.loads((b / "config.json").read_text()), "ociVersion": "2.0.0"})
    ),
    "missing rootfs": lambda b: os.rename(b / "rootfs", b / "gone"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_line_and_leaves_nothing(
    runtime: Runtime, tmp_path: Path, case: str
) -> None:
    bundle = make_bundle(tmp_path, ["true"])
    BAD_INPUTS[case](bundle)
    result = runtime("create", "-b", str(bundle), "c1")
    assert result.returncode == 1
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bonneville: "), lines
    assert not (runtime.root / "c1").exists()


@pytest.mark.parametrize("bad_id", ["a/b", "..", "../escape"])
def test_bad_ids(runtime: Runtime, tmp_path: Path, bad_id: str) -> None:
    bundle = make_bundle(tmp_path, ["true"])
    result = runtime("create", "-b", str(bundle), bad_id)
    assert result.returncode == 1 and b"invalid container id" in result.stderr
    assert not runtime.root.exists() or os.listdir(runtime.root) == []


def test_duplicate_id(runtime: Runtime, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, ["sleep", "100"])
    runtime("create", "-b", str(bundle), "c1", check=True)
    dup = runtime("create", "-b", str(bundle), "c1")
    assert dup.returncode == 1
    assert dup.stderr.strip() == b"bonneville: container with id exists: c1"
    assert runtime.state("c1")["status"] == "created"
    runtime("delete", "c1", check=True)


def test_usage_errors_exit_1(runtime: Runtime) -> None:
    result = runtime("kill")
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
    result = runtime("kill", "c1", "NOTASIGNAL")
    assert result.returncode == 1


def test_spec_and_features(tmp_path: Path) -> None:
    subprocess.run(["bonneville", "spec", "-b", str(tmp_path)], check=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["process"]["args"] == ["sh"] and config["root"]["path"] == "rootfs"
    again = subprocess.run(["bonneville", "spec", "-b", str(tmp_path)], capture_output=True)
    assert again.returncode == 1 and b"exists" in again.stderr
    features = json.loads(
        subprocess.run(["bonneville", "features"], capture_output=True, check=True).stdout
    )
    assert features["ociVersionMin"].startswith("1.")


def test_exec_runs_in_the_running_container(runtime: Runtime, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, ["sh", "-c", "echo init > /tmp/init; sleep 1000"])
    runtime("create", "-b", str(bundle), "c1", check=True)
    runtime("start", "c1", check=True)
    result = runtime("exec", "c1", "sh", "-c", "cat /tmp/init; echo err >&2; exit 5")
    assert (result.returncode, result.stdout, result.stderr) == (5, b"init\n", b"err\n")
    piped = runtime("exec", "c1", "tr", "a-z", "A-Z", input=b"abc\n")
    assert piped.stdout == b"ABC\n" and piped.returncode == 0
    who = runtime(
        "exec",
        "--user",
        "65534:65534",
        "--cwd",
        "/tmp",
        "-e",
        "X=42",
        "c1",
        "sh",
        "-c",
        "id -u; pwd; echo $X",
    )
    assert who.stdout == b"65534\n/tmp\n42\n", who.stderr
    missing = runtime("exec", "c1", "no-such-binary")
    assert missing.returncode != 0 and b"no-such-binary" in missing.stderr
    runtime("delete", "--force", "c1", check=True)


def test_exec_process_file_detached_with_pid_file(runtime: Runtime, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, ["sleep", "1000"])
    runtime("create", "-b", str(bundle), "c1", check=True)
    runtime("start", "c1", check=True)
    process = tmp_path / "process.json"
    process.write_text(
        json.dumps(
            {
                "args": [
                    "sh",
                    "-c",
                    "trap 'exit 9' TERM; echo ready > /tmp/r; while true; do sleep 0.1; done",
                ],
                "cwd": "/",
                "user": {"uid": 0, "gid": 0},
                "env": ["PATH=/bin"],
            }
        )
    )
    pid_file = tmp_path / "exec.pid"
    runtime(
        "exec", "--process", str(process), "--detach", "--pid-file", str(pid_file), "c1", check=True
    )
    proxy = int(pid_file.read_text())
    wait_for((bundle / "rootfs" / "tmp" / "r").exists)
    # The shim signals exec'd processes through their (proxy) PID.
    os.kill(proxy, signal.SIGTERM)
    wait_for(lambda: not procfs.is_alive(proxy, None))
    assert not procfs.is_alive(proxy, None)
    runtime("delete", "--force", "c1", check=True)


def test_exec_carries_what_execve_takes_and_names_what_it_refuses(
    runtime: Runtime, tmp_path: Path
) -> None:
    bundle = make_bundle(tmp_path, ["sleep", "1000"])
    runtime("create", "-b", str(bundle), "c1", check=True)
    runtime("start", "c1", check=True)
    process: dict[str, object] = {
        "args": ["sh", "-c", "echo ${#BIG0} ${#BIG19}"],
        "cwd": "/",
        "user": {"uid": 0, "gid": 0},
        "env": ["PATH=/bin", *strings("BIG", 20, 100_000)],
        "rlimits": [STACK_8_MIB],
    }
    process_file = tmp_path / "process.json"
    process_file.write_text(json.dumps(process))
    result = runtime("exec", "--process", str(process_file), "c1")
    assert (result.returncode, result.stdout) == (0, b"100000 100000\n"), result.stderr
    process["env"] = ["PATH=/bin", "HUGE=" + "x" * 200_000]
    process_file.write_text(json.dumps(process))
    result = runtime("exec", "--process", str(process_file), "c1")
    lines = result.stderr.decode().splitlines()
    assert result.returncode != 0 and len(lines) == 1, lines
    assert lines[0].endswith(
        ": argument list too long (process.env entry HUGE is 195.3 KiB; the kernel accepts at"
        " most 128.0 KiB per string)"
    ), lines
    runtime("delete", "--force", "c1", check=True)


def test_exec_in_a_stopped_container_fails(runtime: Runtime, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, ["true"])
    runtime("create", "-b", str(bundle), "c1", check=True)
    result = runtime("exec", "c1", "true")
    assert result.returncode == 1 and b"cannot exec in a created container" in result.stderr
    runtime("delete", "c1", check=True)


def test_pause_resume_and_ps(runtime: Runtime, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, ["sleep", "1000"])
    runtime("create", "-b", str(bundle), "c1", check=True)
    runtime("start", "c1", check=True)
    pids = json.loads(runtime("ps", "--format", "json", "c1", check=True).stdout)
    assert pids[0] == runtime.state("c1")["pid"] and len(pids) >= 2
    runtime("pause", "c1", check=True)
    assert runtime.state("c1")["status"] == "paused"
    assert runtime("pause", "c1").returncode == 1
    runtime("resume", "c1", check=True)
    assert runtime.state("c1")["status"] == "running"
    runtime("delete", "--force", "c1", check=True)


def test_update_refuses_what_a_vm_cannot_honour(runtime: Runtime, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, ["sleep", "1000"])
    runtime("create", "-b", str(bundle), "c1", check=True)
    runtime("start", "c1", check=True)
    cases = [
        (["--cpuset-cpus", "0"], b"cannot update cpu.cpus: a VM cannot honour it"),
        (["--blkio-weight", "300"], b"cannot update blockIO: a VM cannot honour it"),
        (["--memory", "64g"], b"the VM has 256 MiB, fixed when it started"),
        (["--memory", "lots"], b"invalid size: 'lots'"),
        (["--resources", "-"], b"--resources -: not valid JSON"),
    ]
    for args, message in cases:
        result = runtime("update", *args, "c1", input=b"{nope")
        assert result.returncode == 1, args
        assert message in result.stderr, result.stderr
        assert result.stderr.count(b"\n") == 1
    assert runtime.state("c1")["status"] == "running"
    runtime("kill", "c1", "KILL", check=True)
    wait_status(runtime, "c1", "stopped")
    result = runtime("update", "--pids-limit", "5", "c1")
    assert result.returncode == 1 and b"container not running" in result.stderr
    runtime("delete", "c1", check=True)

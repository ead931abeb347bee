#!/usr/bin/env python3
"""Soak: many containers through Docker, then prove nothing leaked.

    sudo PATH=/opt/bonneville/venv/bin:$PATH python3 benchmarks/soak.py              # 200 + 50
    sudo python3 benchmarks/soak.py --sequential 5 --concurrent 3                    # a short one

A private dockerd (its own data-root, exec-root, socket and bridge, as integration/test_docker.py
starts it, sharing its lock) runs `docker run --rm --runtime bonneville busybox true` N times in
a row, then M at once. Before and after it counts: our processes (monitors, QEMU, shims),
descriptors held by dockerd and containerd, mounts, tap devices and network namespaces, state
files under the exec-root and --clone-glob files; prints a markdown table for
docs/reliability.md. Exit 1 if any run failed or anything leaked.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fcntl
import glob
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # conftest's helpers

from conftest import leftover_processes, make_busybox_rootfs, stop_daemon

IMAGE = "bonneville-busybox:soak"
BRIDGE = "bvtest0"  # the integration tests' bridge; their lock keeps us apart
BRIDGE_ADDRESS = "172.31.250.1/24"
LOCK = "/run/lock/bonneville-test-dockerd.lock"


def _pids(name: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == name:
                        found.append(int(pid))
            except OSError:
                continue
    return found


def _mentions(pid: int, base: Path) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return str(base).encode() in f.read()
    except OSError:
        return False


def _fds(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
    return total


def snapshot(base: Path, clone_glob: str) -> dict[str, int]:
    """Everything that must come back to where it was once the containers are gone (only our
    own daemon's and containers' processes count: other VMs may run on this host)."""
    with open("/proc/self/mountinfo") as f:
        mounts = f.read().splitlines()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    ours = leftover_processes(str(base))
    return {
        "QEMU processes": sum("qemu-system" in p for p in ours),
        "bonneville processes (monitors, exec proxies)": sum(
            "bonneville" in p and "dockerd" not in p for p in ours
        ),
        "containerd shims": sum("containerd-shim" in p for p in ours),
        "dockerd + containerd descriptors": _fds(
            [p for p in _pids("dockerd") + _pids("containerd") if _mentions(p, base)]
        ),
        "host mounts": len(mounts),
        "mounts under the soak's directories": sum(str(base) in m for m in mounts),
        "tap devices on the host": links.count("bvtap"),
        "network namespaces (docker's)": len(glob.glob(str(base / "exec" / "netns" / "*"))),
        "runtime state directories": len(
            glob.glob(str(base / "exec" / "**" / "state.json"), recursive=True)
        ),
        "template-clone files": len(glob.glob(clone_glob)) if clone_glob else 0,
    }


class Dockerd:
    def __init__(self, base: Path, runtime: str) -> None:
        self.base = base
        self.runtime = runtime
        self.sock = base / "docker.sock"
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True, check=False)
        subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], check=True)
        subprocess.run(["ip", "addr", "add", BRIDGE_ADDRESS, "dev", BRIDGE], check=True)
        subprocess.run(["ip", "link", "set", BRIDGE, "up"], check=True)
        self.log = open(base / "dockerd.log", "wb")  # noqa: SIM115
        self.daemon = subprocess.Popen(
            [
                "dockerd",
                "--data-root", str(base / "data"),
                "--exec-root", str(base / "exec"),
                "--host", f"unix://{self.sock}",
                "--pidfile", str(base / "dockerd.pid"),
                "--add-runtime", f"bonneville={shutil.which('bonneville')}",
                f"--bridge={BRIDGE}",
                "--iptables=false",
                "--ip-masq=false",
            ],
            stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.sock}"}
        deadline = time.monotonic() + 60
        while self.docker("version").returncode != 0:
            if self.daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("dockerd did not come up; see " + str(base / "dockerd.log"))
            time.sleep(0.2)
        rootfs = make_busybox_rootfs(base / "rootfs")
        tar = subprocess.run(["tar", "-C", str(rootfs), "-c", "."], capture_output=True, check=True)
        imported = self.docker("import", "-", IMAGE, input=tar.stdout)
        if imported.returncode != 0:
            raise SystemExit(f"docker import failed: {imported.stderr!r}")

    def docker(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["docker", *args],
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            env=self.env,
            timeout=600,
            check=False,
        )

    def run_one(self) -> tuple[float, str]:
        started = time.monotonic()
        result = self.docker("run", "--rm", "--runtime", self.runtime, IMAGE, "true")
        error = "" if result.returncode == 0 else result.stderr.decode(errors="replace").strip()
        return time.monotonic() - started, error

    def close(self) -> None:
        ids = self.docker("ps", "-aq").stdout.split()
        if ids:
            self.docker("rm", "-f", *[i.decode() for i in ids])
        stop_daemon(self.daemon, self.base)
        self.log.close()
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True, check=False)


def _wait_settled(base: Path, clone_glob: str, before: dict[str, int]) -> dict[str, int]:
    """Shims and monitors finish a moment after `docker run` returns: poll, then report."""
    deadline = time.monotonic() + 60
    while True:
        after = snapshot(base, clone_glob)
        if after == before or time.monotonic() > deadline:
            return after
        time.sleep(0.5)


def _times(label: str, runs: list[tuple[float, str]], wall: float) -> str:
    times = sorted(t for t, _ in runs)
    failed = [e for _, e in runs if e]
    p95 = times[min(len(times) - 1, int(len(times) * 0.95))]
    return (
        f"| {label} | {len(runs)} | {len(failed)} | {wall:.1f} s | "
        f"{statistics.median(times):.2f} s | {p95:.2f} s |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequential", type=int, default=200)
    parser.add_argument("--concurrent", type=int, default=50)
    parser.add_argument("--runtime", default="bonneville", help="runc gives a baseline")
    parser.add_argument("--clone-glob", default="", help="files a clone leaves if it leaks")
    args = parser.parse_args()
    lock = open(LOCK, "w")  # noqa: SIM115
    fcntl.flock(lock, fcntl.LOCK_EX)
    base = Path(tempfile.mkdtemp(prefix="bvsoak-", dir="/tmp"))
    daemon = Dockerd(base, args.runtime)
    failures: list[str] = []
    try:
        # Warm-up, alone and in parallel: the image cache and the daemons' lazily opened
        # connections must not count as leaks.
        daemon.run_one()
        with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
            list(pool.map(lambda _: daemon.run_one(), range(3)))
        before = _wait_settled(base, args.clone_glob, {})
        started = time.monotonic()
        sequential = [daemon.run_one() for _ in range(args.sequential)]
        seq_wall = time.monotonic() - started
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.concurrent) as pool:
            parallel = list(pool.map(lambda _: daemon.run_one(), range(args.concurrent)))
        par_wall = time.monotonic() - started
        after = _wait_settled(base, args.clone_glob, before)
        failures = [e for _, e in sequential + parallel if e]
        print("| runs | containers | failed | wall | median | p95 |")
        print("| --- | --- | --- | --- | --- | --- |")
        print(_times("sequential", sequential, seq_wall))
        print(_times("concurrent", parallel, par_wall))
        print()
        print("| resource | before | after |")
        print("| --- | --- | --- |")
        for key in before:
            print(f"| {key} | {before[key]} | {after[key]} |")
        for error in sorted(set(failures))[:10]:
            print(f"\nfailure: {error}")
        leaked = {k for k in before if after[k] > before[k]}
        if leaked:
            print(f"\nLEAKED: {', '.join(sorted(leaked))}")
        return 1 if failures or leaked else 0
    finally:
        daemon.close()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

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
import glob
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.support

from tests.support import Docker, leftover_processes, private_dockerd, use_checkout_launcher

IMAGE = "bonneville-busybox:soak"


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


def run_one(docker: Docker, runtime: str) -> tuple[float, str]:
    started = time.monotonic()
    result = docker("run", "--rm", "--runtime", runtime, IMAGE, "true", timeout=600)
    error = "" if result.returncode == 0 else result.stderr.decode(errors="replace").strip()
    return time.monotonic() - started, error


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
    bonneville = str(use_checkout_launcher())  # this checkout's code
    failures: list[str] = []
    with private_dockerd({"bonneville": {"path": bonneville}}, IMAGE) as docker:
        base = Path(docker.socket_path).parent

        def one(_: object = None) -> tuple[float, str]:
            return run_one(docker, args.runtime)

        # Warm-up, alone and in parallel: the image cache and the daemons' lazily opened
        # connections must not count as leaks.
        one()
        with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
            list(pool.map(one, range(3)))
        before = _wait_settled(base, args.clone_glob, {})
        started = time.monotonic()
        sequential = [one() for _ in range(args.sequential)]
        seq_wall = time.monotonic() - started
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.concurrent) as pool:
            parallel = list(pool.map(one, range(args.concurrent)))
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


if __name__ == "__main__":
    sys.exit(main())

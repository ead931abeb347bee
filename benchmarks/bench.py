#!/opt/bonneville/venv/bin/python
"""Bonneville against runc, crun and runsc (gVisor), measured in one run on this machine.

    ./benchmarks/bench.py [--runs N] [--only docker,cli,memory,concurrent,io,pod]

Every figure is a median over N runs (after one warm-up), printed with its ratio to runc's,
measured in the same run. Markdown tables go to stdout (docs/benchmarks.md holds a real run).
Needs root, dockerd, the runtimes (crun and runsc are skipped if missing) and install.sh's venv;
the `bonneville` measured is this checkout's (a launcher for it goes first on PATH). Nothing here
asserts a time: these are measurements, not tests.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bonneville.guest.proc import descendants
from tests.support import (
    Docker,
    default_config,
    make_busybox_rootfs,
    private_dockerd,
    use_checkout_launcher,
    write_bundle,
)

IMAGE = "bonneville-busybox:bench"
SECTIONS = ("docker", "cli", "memory", "concurrent", "io", "pod")


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def median_of(runs: int, action: Callable[[], object], warmup: int = 1) -> float:
    for _ in range(warmup):
        action()
    return statistics.median(timed(action) for _ in range(runs))


class Failed(Exception):
    """A runtime that cannot run here; the table says why instead of a figure."""


def attempt(action: Callable[[], float]) -> float | str:
    try:
        return action()
    except (subprocess.CalledProcessError, AssertionError, Failed, RuntimeError) as exc:
        stderr = getattr(exc, "stderr", None)
        text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else str(exc)
        text = " ".join(text.replace("\\n", "\n").split())
        text = text.replace("docker: Error response from daemon: ", "")
        # dockerd wraps the runtime's own words: "… OCI runtime create failed: <them>: unknown".
        text = text.rpartition("OCI runtime create failed: ")[2].partition(": unknown")[0] or text
        return "fails here: " + (text if len(text) <= 160 else "…" + text[-160:])


def fmt(value: float | str, base: float | str) -> list[str]:
    """A figure and its ratio to runc's, or the reason there is none."""
    if isinstance(value, str):
        return [value, "–"]
    return [f"{value:.2f} s", ratio(value, base) if isinstance(base, float) else "–"]


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(value: float, base: float) -> str:
    return f"{value / base:.1f}×" if base > 0 else "–"


def machine() -> str:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    kvm = "no (TCG)"
    qemu = subprocess.run(
        ["qemu-system-x86_64", "-version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[0]
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} × {cpu}, {mem:.0f} GiB, Linux {platform.release()}, "
        f"KVM usable: {kvm}, {qemu}"
    )


@contextmanager
def cold_wrapper() -> Iterator[str]:
    """A `bonneville` that never clones: what dockerd runs as the bonneville-cold runtime."""
    directory = tempfile.mkdtemp(prefix="bvbench-")
    path = os.path.join(directory, "bonneville-cold")
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\nBONNEVILLE_CLONE=0 exec {shutil.which("bonneville")} "$@"\n')
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def docker_runtimes(cold: str, runsc: list[str]) -> dict[str, dict[str, object]]:
    """daemon.json's runtimes: both bonneville modes, and crun and runsc where installed."""
    runtimes: dict[str, dict[str, object]] = {
        "bonneville": {"path": shutil.which("bonneville") or ""},
        "bonneville-cold": {"path": cold},
    }
    for name in ("crun", "runsc"):
        path = shutil.which(name)
        if path:
            runtimes[name] = {"path": path}
    if "runsc" in runtimes and runsc:
        runtimes["runsc"]["runtimeArgs"] = runsc
    return runtimes


def runsc_args() -> list[str]:
    """runsc's flags here: `--network=host` where a new network namespace has
    /proc/sys/net/core/rmem_default, as on kernels since 6.x. Debian 12's runsc (2022) takes
    that file for the mark of the host's namespace and then refuses its own network stack in
    every container ("cannot run with network enabled in root network namespace"); with
    `--network=host` it runs, still in the container's namespace that dockerd made, on the
    kernel's network stack instead of gVisor's netstack."""
    probe = ["unshare", "--net", "test", "-e", "/proc/sys/net/core/rmem_default"]
    looks_like_root = subprocess.run(probe, capture_output=True, check=False).returncode == 0
    return ["--network=host"] if looks_like_root else []


# ---- sections --------------------------------------------------------------------------------


def bench_docker(docker: Docker, runtimes: list[str], runs: int) -> str:
    """Rounds of one run per runtime, interleaved: the machine's slow spells (a busy neighbour,
    page cache reclaim) then hit every runtime alike instead of one runtime's whole series."""
    results: dict[tuple[str, str], float | str] = {}
    for label, args in (("true", ["true"]), ("echo", ["echo", "hi"])):
        samples: dict[str, list[float]] = {runtime: [] for runtime in runtimes}
        failed: dict[str, str] = {}
        for round_ in range(runs + 1):  # round 0 warms up (and finds who cannot run here)
            for runtime in runtimes:
                if runtime in failed:
                    continue
                outcome = attempt(
                    lambda r=runtime, a=args: timed(
                        lambda: docker.ok("run", "--rm", "--runtime", r, IMAGE, *a)
                    )
                )
                if isinstance(outcome, str):
                    failed[runtime] = outcome
                elif round_:
                    samples[runtime].append(outcome)
        for runtime in runtimes:
            results[runtime, label] = failed.get(runtime) or statistics.median(samples[runtime])
    rows = []
    for runtime in runtimes:
        row = [runtime]
        for label in ("true", "echo"):
            row += fmt(results[runtime, label], results["runc", label])
        rows.append(row)
    headers = ["runtime", "`run --rm true`", "vs runc", "`run --rm echo hi`", "vs runc"]
    return f"### docker run, wall time (median of {runs})\n\n{table(headers, rows)}"


def _cli_cycle(binary: list[str], root: str, bundle: Path, cid: str) -> None:
    def cli(*args: str) -> bytes:
        # Files, not pipes: the container (runc's init, our monitor) keeps the stdio of
        # `create` open, so reading a pipe to its end would wait for the container.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            result = subprocess.run(
                [*binary, "--root", root, *args], stdin=subprocess.DEVNULL, stdout=out, stderr=err
            )
            out.seek(0)
            err.seek(0)
            if result.returncode:
                raise Failed(err.read().decode(errors="replace") or f"{args[0]} failed")
            return out.read()

    try:
        cli("create", "--bundle", str(bundle), cid)
        cli("start", cid)
        deadline = time.monotonic() + 120
        while json.loads(cli("state", cid))["status"] != "stopped":
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cid} did not stop")
            time.sleep(0.005)
    finally:
        subprocess.run([*binary, "--root", root, "delete", "--force", cid], capture_output=True)


def bench_cli(work: Path, runs: int, runsc: list[str]) -> str:
    bundle = write_bundle(work / "cli-bundle", default_config(["true"]))
    variants: dict[str, tuple[list[str], dict[str, str]]] = {
        "runc": (["runc"], {}),
        "bonneville (clone)": (["bonneville"], {}),
        "bonneville (cold boot)": (["bonneville"], {"BONNEVILLE_CLONE": "0"}),
    }
    if shutil.which("crun"):
        variants["crun"] = (["crun"], {})
    if shutil.which("runsc"):
        variants["runsc"] = (["runsc", *runsc], {})
    results: dict[str, float | str] = {}
    for name, (binary, env) in variants.items():
        root = str(work / f"cli-root-{len(results)}")
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            counter = iter(range(10_000))
            results[name] = attempt(
                lambda b=binary, r=root, c=counter: median_of(
                    runs, lambda: _cli_cycle(b, r, bundle, f"c{next(c)}")
                )
            )
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    rows = [[name, *fmt(value, results["runc"])] for name, value in results.items()]
    heading = f"### create + start + wait + delete through the CLI (median of {runs})"
    return f"{heading}\n\n{table(['runtime', 'time', 'vs runc'], rows)}"


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def bench_memory(work: Path, count: int = 10) -> str:
    bundle = write_bundle(work / "mem-bundle", default_config(["sleep", "100000"]))
    rows = []
    for label, env in (("clone", {}), ("cold boot", {"BONNEVILLE_CLONE": "0"})):
        root = str(work / f"mem-root-{label.replace(' ', '-')}")
        run_env = {**os.environ, **env}
        ids = [f"m{n}" for n in range(count)]
        try:
            for cid in ids:
                subprocess.run(
                    ["bonneville", "--root", root, "create", "--bundle", str(bundle), cid],
                    env=run_env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    check=True,
                )
                subprocess.run(
                    ["bonneville", "--root", root, "start", cid], check=True, env=run_env
                )
            time.sleep(10)  # idle: let the guests settle (a measurement interval, not a wait)
            monitors, vms = [], []
            for cid in ids:
                state = json.loads(
                    subprocess.run(
                        ["bonneville", "--root", root, "state", cid],
                        capture_output=True,
                        check=True,
                    ).stdout
                )
                monitors.append(pss_kib(int(state["pid"])))
                vms.append(sum(pss_kib(p) for p in descendants(int(state["pid"]))))
            per = [(m + v) / 1024 for m, v in zip(monitors, vms, strict=True)]
            rows.append(
                [
                    label,
                    f"{statistics.mean(per):.1f} MiB",
                    f"{statistics.mean(vms) / 1024:.1f} MiB",
                    f"{statistics.mean(monitors) / 1024:.1f} MiB",
                ]
            )
        finally:
            for cid in ids:
                subprocess.run(
                    ["bonneville", "--root", root, "delete", "--force", cid],
                    capture_output=True,
                    check=False,
                )
    return f"### memory per idle container, {count} running (PSS from smaps_rollup)\n\n" + table(
        ["start", "monitor + QEMU", "QEMU", "monitor"], rows
    )


def bench_concurrent(docker: Docker, runtimes: list[str], count: int = 20) -> str:
    rows = []
    for runtime in runtimes:

        def one(n: int, r: str = runtime) -> bool:
            result = docker("run", "--rm", "--runtime", r, IMAGE, "echo", str(n), timeout=600)
            return result.returncode == 0 and result.stdout.strip() == str(n).encode()

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(count) as pool:
            ok = list(pool.map(one, range(count)))
        total = time.perf_counter() - start
        rows.append([runtime, f"{total:.1f} s", str(ok.count(False))])
    return f"### {count} `docker run --rm` at once\n\n" + table(
        ["runtime", "total time", "failures"], rows
    )


# /proc/uptime (centiseconds) is the clock both busybox shells have; `time` and `date +%N` are
# not in every busybox build. Each step prints "T start end".
IO_SCRIPT = (
    "t() { read a b < /proc/uptime; echo $a; }; cd {dir} || exit 1; "
    "s=$(t); dd if=/dev/zero of=big bs=1M count=64 2>/dev/null; sync; echo T $s $(t); "
    "s=$(t); dd if=big of=/dev/null bs=1M 2>/dev/null; echo T $s $(t); "
    "s=$(t); i=0; while [ $i -lt 500 ]; do echo x > f$i; i=$((i+1)); done; echo T $s $(t); "
    "s=$(t); cat f* >/dev/null; echo T $s $(t); "
    "rm -f big f*"
)
_STEP = re.compile(r"^T ([\d.]+) ([\d.]+)$", re.MULTILINE)


def _times(stdout: str) -> list[float]:
    return [float(end) - float(start) for start, end in _STEP.findall(stdout)]


def bench_io(work: Path) -> str:
    data = work / "io-data"
    data.mkdir()
    host = subprocess.run(
        ["busybox", "sh", "-c", IO_SCRIPT.replace("{dir}", str(data))],
        capture_output=True,
        text=True,
        check=True,
    )
    config = default_config(["sh", "-c", IO_SCRIPT.replace("{dir}", "/data")])
    config["mounts"] = [
        *config["mounts"],  # type: ignore[misc]
        {"destination": "/data", "type": "bind", "source": str(data), "options": ["rbind", "rw"]},
    ]
    bundle = write_bundle(work / "io-bundle", config)
    guest = subprocess.run(
        ["bonneville", "--root", str(work / "io-root"), "run", "--bundle", str(bundle), "io"],
        capture_output=True,
        text=True,
        check=True,
    )
    host_t, guest_t = _times(host.stdout), _times(guest.stdout)
    labels = [
        "write 64 MiB (dd bs=1M)",
        "read 64 MiB (dd bs=1M)",
        "create 500 small files",
        "read 500 small files",
    ]
    rows = []
    for label, h, g in zip(labels, host_t, guest_t, strict=True):
        rows.append([label, f"{h:.2f} s", f"{g:.2f} s", ratio(g, h)])
    heading = "### file I/O: 9p inside the VM vs the host directory (timed with /proc/uptime)"
    return f"{heading}\n\n{table(['operation', 'host', 'in the VM (9p)', 'ratio'], rows)}"


def bench_pod(work: Path, runs: int) -> str:
    """A Kubernetes pod's start through containerd's CRI (a private containerd, as the CRI
    tests start it): RunPodSandbox, then CreateContainer + StartContainer of one container, as
    kubelet asks; and the pod's removal (StopPodSandbox + RemovePodSandbox)."""
    from integration.cri import CriClient, Pods, make_images, private_containerd

    rows: list[list[str]] = []
    base_start: float | str = "–"
    base_stop: float | str = "–"
    with private_containerd(make_images(work / "cri-images")) as daemon:
        client = CriClient(daemon.endpoint)
        try:
            for handler in ("runc", "bonneville"):
                pods = Pods(client, daemon, handler, work / "pod-logs" / handler)
                starts: list[float] = []
                stops: list[float] = []
                for run in range(runs + 1):  # the first is a warm-up
                    began = time.perf_counter()
                    pod = pods.pod(f"bench-{handler}-{run}")
                    pods.container(pod, "app", ["sleep", "3600"])
                    started = time.perf_counter()
                    client.stop_pod_sandbox(pod.id)
                    client.remove_pod_sandbox(pod.id)
                    if run:
                        starts.append(started - began)
                        stops.append(time.perf_counter() - started)
                start, stop = statistics.median(starts), statistics.median(stops)
                if handler == "runc":
                    base_start, base_stop = start, stop
                rows.append([handler, *fmt(start, base_start), *fmt(stop, base_stop)])
        finally:
            client.close()
    return table(
        ["handler", "pod start (runp + create + start)", "×runc", "stopp + rmp", "×runc"],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only", default=",".join(SECTIONS))
    args = parser.parse_args()
    only = set(args.only.split(","))
    if os.geteuid() != 0:
        sys.exit("bench.py: run as root")
    use_checkout_launcher()  # this checkout's code, whichever checkout install.sh installed
    subprocess.run(["bonneville", "template", "build"], check=True, capture_output=True)
    print(f"## Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print(f"Machine: {machine()}\n", flush=True)
    runsc = runsc_args() if shutil.which("runsc") else []
    with tempfile.TemporaryDirectory(prefix="bvbench-") as tmp:
        work = Path(tmp)
        make_busybox_rootfs(work / "cli-bundle" / "rootfs")
        if only & {"docker", "concurrent"}:
            with cold_wrapper() as cold:
                runtimes = docker_runtimes(cold, runsc)
                with private_dockerd(runtimes, IMAGE) as docker:
                    names = ["runc", *runtimes]
                    if "runsc" in runtimes and runsc:
                        print(f"runsc runs with {' '.join(runsc)} (see runsc_args)\n")
                    if "docker" in only:
                        print(bench_docker(docker, names, args.runs) + "\n", flush=True)
                    if "concurrent" in only:
                        print(bench_concurrent(docker, ["runc", "bonneville"]) + "\n", flush=True)
        if "cli" in only:
            print(bench_cli(work, args.runs, runsc) + "\n", flush=True)
        if "memory" in only:
            print(bench_memory(work) + "\n", flush=True)
        if "io" in only:
            print(bench_io(work) + "\n", flush=True)
        if "pod" in only:
            print(bench_pod(work, args.runs) + "\n", flush=True)


if __name__ == "__main__":
    main()

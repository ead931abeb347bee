#!/opt/bonneville/venv/bin/python
"""Bonneville against runc, crun and runsc (gVisor), measured in one run on this machine.

    ./benchmarks/bench.py [--runs N] [--only docker,cli,memory,concurrent,io,pod] [--check]

Every time is a median over N rounds, each round running every candidate once in the same
order (interleaved), printed with its ratio to runc's measured in the same run; memory figures
are medians over the containers measured. Markdown tables go to stdout (docs/benchmarks.md
holds a real run); the header names the accelerator a running Bonneville VM really uses, read
from its QEMU's command line. `--check` ends with issue 25's targets, each met or missed with
its figure. Needs root, dockerd, the runtimes (crun and runsc are skipped if missing) and
install.sh's venv; the `bonneville` measured is this checkout's (a launcher for it goes first
on PATH). Nothing here asserts a time: these are measurements, not tests.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import io
import itertools
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bonneville.guest.proc import descendants
from tests.support import (
    Docker,
    default_config,
    private_dockerd,
    use_checkout_launcher,
    write_bundle,
)

IMAGE = "bonneville-busybox:bench"
SECTIONS = ("docker", "cli", "memory", "concurrent", "io", "pod")
DOCKERD_SECTIONS = {"docker", "memory", "concurrent", "io"}
CHECK_ROUNDS = 9  # the `docker run` target is judged on at least this many rounds
BONNEVILLE = ["bonneville"]
IDLE_SECONDS = 10  # how long containers idle before their memory is read
CLI_MEMORY_COUNT = 10
DOCKER_MEMORY_COUNTS = (5, 20)  # containers running when the docker path's memory is read
CONCURRENT = 50
IO_MIB = 128
SMALL_FILES = 1000
TREE_DIRS, TREE_FILES_PER_DIR = 50, 100  # the unpacked tree: 5,000 files


# ---- measuring -------------------------------------------------------------------------------


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


class Failed(Exception):
    """A runtime that cannot run here; the table says why instead of a figure."""


MEASUREMENT_ERRORS = (
    subprocess.CalledProcessError,
    subprocess.TimeoutExpired,
    AssertionError,
    Failed,
    RuntimeError,
)


def why(exc: BaseException) -> str:
    """A failure in one short line: dockerd's wrapping around the runtime's own words removed."""
    stderr = getattr(exc, "stderr", None)
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else str(exc)
    text = " ".join(text.replace("\\n", "\n").split())
    text = text.replace("docker: Error response from daemon: ", "")
    # dockerd wraps the runtime's own words: "… OCI runtime create failed: <them>: unknown".
    text = text.rpartition("OCI runtime create failed: ")[2].partition(": unknown")[0] or text
    return "fails here: " + (text if len(text) <= 160 else "…" + text[-160:])


Samples = dict[str, list[float]]  # figure name → one value per round


def interleaved(
    runs: int, candidates: dict[str, Callable[[], dict[str, float]]], warmup: bool = True
) -> dict[str, Samples | str]:
    """`runs` rounds (after a warm-up round unless ``warmup`` is false), each calling every
    candidate once, in the same order: the machine's slow spells (a busy neighbour, page cache
    reclaim) then hit every candidate alike instead of one candidate's whole series. A candidate
    that fails is dropped, the reason standing in for its samples."""
    samples: dict[str, Samples] = {name: {} for name in candidates}
    failed: dict[str, str] = {}
    for round_ in range(runs + 1 if warmup else runs):
        for name, measure in candidates.items():
            if name in failed:
                continue
            try:
                figures = measure()
            except MEASUREMENT_ERRORS as exc:
                failed[name] = why(exc)
                continue
            if round_ or not warmup:
                for key, value in figures.items():
                    samples[name].setdefault(key, []).append(value)
    return {name: failed.get(name) or samples[name] for name in candidates}


def median(result: Samples | str, key: str) -> float | str:
    return result if isinstance(result, str) else statistics.median(result[key])


# ---- printing --------------------------------------------------------------------------------


def rounds(runs: int) -> str:
    return f"{runs} round" if runs == 1 else f"{runs} rounds"


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(value: float, base: float) -> str:
    return f"{value / base:.1f}×" if base > 0 else "–"


def duration(value: float | str) -> str:
    return value if isinstance(value, str) else f"{value:.2f} s"


def seconds(value: float | str, base: float | str) -> list[str]:
    """A time and its ratio to runc's, or the reason there is none."""
    if isinstance(value, str) or isinstance(base, str):
        return [duration(value), "–"]
    return [duration(value), ratio(value, base)]


# ---- the targets (--check) -------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    """What a target is judged on: ``value`` (None when there is no figure: ``text`` says why)
    and how it reads; ``caveat`` says why the figure cannot be judged."""

    value: float | None
    text: str
    caveat: str = ""


@dataclass(frozen=True)
class Section:
    text: str
    figures: dict[str, Figure] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    key: str
    wording: str
    limit: float
    at_least: bool = False  # the figure must reach the limit (else: stay within it)

    def verdict(self, figure: Figure | None) -> str:
        if figure is None:
            return "not measured"
        if figure.value is None:
            return "missed"
        if figure.caveat:
            return f"not judged: {figure.caveat}"
        met = figure.value >= self.limit if self.at_least else figure.value <= self.limit
        return "met" if met else "missed"


TARGETS = (
    Target("docker-true", "`docker run --rm IMG true` ≤ 2.2× runc", 2.2),
    Target(
        "cold-boot", "cold boot (`BONNEVILLE_CLONE=0`, `docker run --rm IMG true`) ≤ 2.5 s", 2.5
    ),
    Target("memory-docker-5", "idle memory per container ≤ 56 MiB PSS: docker, 5 running", 56),
    Target("memory-docker-20", "idle memory per container ≤ 56 MiB PSS: docker, 20 running", 56),
    Target("memory-cli", "idle memory per container ≤ 56 MiB PSS: CLI (clone)", 56),
    Target("concurrent", f"{CONCURRENT} concurrent `docker run --rm`: all succeed", 0),
    Target("small-rootfs", f"{SMALL_FILES:,} small files created ≤ 10× runc: rootfs", 10),
    Target("small-bind", f"{SMALL_FILES:,} small files created ≤ 10× runc: bind volume", 10),
    Target("write-rootfs", "sequential write ≥ 50% of runc's throughput: rootfs", 0.5, True),
    Target("write-bind", "sequential write ≥ 50% of runc's throughput: bind volume", 0.5, True),
    Target("read-rootfs", "sequential read ≥ 50% of runc's throughput: rootfs", 0.5, True),
    Target("read-bind", "sequential read ≥ 50% of runc's throughput: bind volume", 0.5, True),
)


def check(figures: dict[str, Figure]) -> str:
    rows = []
    for target in TARGETS:
        figure = figures.get(target.key)
        measured = figure.text if figure else "– (its section did not run)"
        rows.append([target.wording, measured, target.verdict(figure)])
    return "### Against the targets (issue 25)\n\n" + table(["target", "measured", "verdict"], rows)


# ---- the machine -----------------------------------------------------------------------------


def machine(accelerator: str) -> str:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    qemu = subprocess.run(
        ["qemu-system-x86_64", "-version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[0]
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} × {cpu}, {mem:.0f} GiB, Linux {platform.release()}, {qemu}\n\n"
        f"Accelerator: {accelerator}"
    )


def accelerators(argv: list[str]) -> tuple[list[str], str]:
    """The accelerators a QEMU command line names (`-accel X,…`, `-machine …,accel=X:Y`), and
    the options that name them."""
    found, options = [], []
    for option, value in itertools.pairwise(argv):
        if option == "-accel":
            found.append(value.split(",")[0])
            options.append(f"`{option} {value}`")
        elif option in ("-machine", "-M"):
            for part in value.split(","):
                if part.startswith("accel="):
                    found += part.removeprefix("accel=").split(":")
                    options.append(f"`{option} …{part}…`")
    return found, " ".join(options)


def accelerator(work: Path) -> str:
    """The accelerator a Bonneville VM really runs on, from a running container's QEMU command
    line. QEMU given one accelerator fails rather than fall back, so that one is in use."""
    bundle = write_bundle(work / "accel-bundle", default_config(["sleep", "100000"]))
    root = str(work / "accel-root")
    try:
        cli(BONNEVILLE, root, {}, "create", "--bundle", str(bundle), "accel")
        cli(BONNEVILLE, root, {}, "start", "accel")
        for pid in descendants(cli_running_pid(BONNEVILLE, root, {}, "accel")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().decode(errors="replace").split("\0")
            except OSError:
                continue
            if os.path.basename(argv[0]).startswith("qemu-system"):
                named, options = accelerators(argv)
                where = f"a running container's QEMU has {options or 'no accelerator option'}"
                if len(named) == 1:
                    return f"{named[0].upper()} ({where})"
                return f"one of {', '.join(named) or 'QEMU’s default'} ({where})"
        return "unknown: no QEMU below a running container's monitor"
    except MEASUREMENT_ERRORS as exc:
        return f"unknown: a container to read it from {why(exc)}"
    finally:
        cli_delete(BONNEVILLE, root, {}, "accel")


# ---- the runtimes ----------------------------------------------------------------------------


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


DOCKER_LABELS = {"bonneville": "bonneville (clone)", "bonneville-cold": "bonneville (cold boot)"}


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


def cli(binary: list[str], root: str, env: dict[str, str], *args: str) -> bytes:
    """One call of a runtime's CLI (with ``env`` added to ours); its stdout."""
    # Files, not pipes: the container (runc's init, our monitor) keeps the stdio of
    # `create` open, so reading a pipe to its end would wait for the container.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        result = subprocess.run(
            [*binary, "--root", root, *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env={**os.environ, **env},
            close_fds=True,
            check=False,
        )
        out.seek(0)
        err.seek(0)
        if result.returncode:
            raise Failed(err.read().decode(errors="replace") or f"{args[0]} failed")
        return out.read()


def cli_delete(binary: list[str], root: str, env: dict[str, str], cid: str) -> None:
    subprocess.run(
        [*binary, "--root", root, "delete", "--force", cid],
        capture_output=True,
        env={**os.environ, **env},
        check=False,
    )


def cli_running_pid(binary: list[str], root: str, env: dict[str, str], cid: str) -> int:
    """The container's PID (our monitor's) once its state says it runs."""
    state = json.loads(cli(binary, root, env, "state", cid))
    if state["status"] != "running":
        raise Failed(f"container {cid} is {state['status']}, not running")
    return int(state["pid"])


def docker_running_pid(docker: Docker, name: str) -> int:
    """The container's PID (for bonneville our monitor's) once dockerd says it runs."""
    running, pid = docker.ok("inspect", "-f", "{{.State.Running}} {{.State.Pid}}", name).split()
    if running != "true":
        raise Failed(f"container {name} is not running")
    return int(pid)


def docker_start(docker: Docker, runtime: str, name: str, *options: str) -> None:
    """A detached idle container, checked running."""
    docker.ok("run", "-d", "--name", name, "--runtime", runtime, *options, IMAGE, "sleep", "1d")
    docker_running_pid(docker, name)


# ---- docker run ------------------------------------------------------------------------------


def bench_docker(docker: Docker, runtimes: list[str], runs: int, runsc: list[str]) -> Section:
    def run(runtime: str) -> dict[str, float]:
        def echo() -> None:
            out = docker.ok("run", "--rm", "--runtime", runtime, IMAGE, "echo", "hi")
            assert out == "hi\n", f"echo hi printed {out!r}"

        return {
            "true": timed(lambda: docker.ok("run", "--rm", "--runtime", runtime, IMAGE, "true")),
            "echo": timed(echo),
        }

    results = interleaved(runs, {r: functools.partial(run, r) for r in runtimes})
    base = {label: median(results["runc"], label) for label in ("true", "echo")}
    rows = []
    for runtime, result in results.items():
        label = DOCKER_LABELS.get(runtime, runtime)
        if runtime == "runsc" and runsc:
            label += f" (`{' '.join(runsc)}`)"
        rows.append([label, *seconds(median(result, "true"), base["true"])])
        rows[-1] += seconds(median(result, "echo"), base["echo"])
    headers = ["runtime", "`run --rm true`", "vs runc", "`run --rm echo hi`", "vs runc"]
    text = f"### docker run, wall time (median of {rounds(runs)}, interleaved)\n\n"
    return Section(text + table(headers, rows), docker_figures(results, base["true"], runs))


def docker_figures(
    results: dict[str, Samples | str], runc: float | str, runs: int
) -> dict[str, Figure]:
    """The figures the `docker run` and cold boot targets read."""
    clone, cold = median(results["bonneville"], "true"), median(results["bonneville-cold"], "true")
    figures = {}
    if isinstance(cold, str):
        figures["cold-boot"] = Figure(None, cold)
    else:
        figures["cold-boot"] = Figure(cold, f"{cold:.2f} s (median of {rounds(runs)})")
    if isinstance(clone, str) or isinstance(runc, str):
        figures["docker-true"] = Figure(None, clone if isinstance(clone, str) else f"runc {runc}")
    else:
        text = f"{clone / runc:.2f}× ({clone:.2f} s vs {runc:.2f} s, median of {rounds(runs)})"
        few = f"{rounds(runs)}, fewer than {CHECK_ROUNDS}" if runs < CHECK_ROUNDS else ""
        figures["docker-true"] = Figure(clone / runc, text, few)
    return figures


# ---- the CLI ---------------------------------------------------------------------------------


def cli_cycle(binary: list[str], root: str, env: dict[str, str], bundle: Path, cid: str) -> None:
    """create, start, poll state until stopped, delete: what a caller of the CLI alone does."""
    try:
        cli(binary, root, env, "create", "--bundle", str(bundle), cid)
        cli(binary, root, env, "start", cid)
        deadline = time.monotonic() + 120
        while json.loads(cli(binary, root, env, "state", cid))["status"] != "stopped":
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cid} did not stop")
            time.sleep(0.005)
    finally:
        cli_delete(binary, root, env, cid)


def bench_cli(work: Path, runs: int, runsc: list[str]) -> Section:
    bundle = write_bundle(work / "cli-bundle", default_config(["true"]))
    variants: dict[str, tuple[list[str], dict[str, str]]] = {
        "runc": (["runc"], {}),
        "bonneville (clone)": (BONNEVILLE, {}),
        "bonneville (cold boot)": (BONNEVILLE, {"BONNEVILLE_CLONE": "0"}),
    }
    if shutil.which("crun"):
        variants["crun"] = (["crun"], {})
    if shutil.which("runsc"):
        variants["runsc"] = (["runsc", *runsc], {})
    ids = itertools.count()

    def cycle(n: int, binary: list[str], env: dict[str, str]) -> dict[str, float]:
        root = str(work / f"cli-root-{n}")
        return {"time": timed(lambda: cli_cycle(binary, root, env, bundle, f"c{next(ids)}"))}

    results = interleaved(
        runs,
        {
            name: functools.partial(cycle, n, binary, env)
            for n, (name, (binary, env)) in enumerate(variants.items())
        },
    )
    base = median(results["runc"], "time")
    rows = [[name, *seconds(median(result, "time"), base)] for name, result in results.items()]
    heading = f"### create + start + wait + delete through the CLI (median of {rounds(runs)})"
    return Section(f"{heading}\n\n{table(['runtime', 'time', 'vs runc'], rows)}")


# ---- memory ----------------------------------------------------------------------------------


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cgroup_of(pid: int | str) -> str | None:
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return f.read()
    except OSError:
        return None


def cgroup_mates(pid: int) -> list[int]:
    """The processes in ``pid``'s cgroups (exec proxies join their monitor's); none when it is
    in ours (then it has no cgroup of its own)."""
    theirs = cgroup_of(pid)
    if theirs is None or theirs == cgroup_of("self"):
        return []
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and cgroup_of(p) == theirs]


@dataclass(frozen=True)
class Footprint:
    """PSS in KiB of one container's host processes."""

    monitor: int
    vm: int  # the monitor's descendants: QEMU
    total: int  # monitor, QEMU and the rest of the container's cgroup (exec proxies)


def footprint(monitor: int) -> Footprint:
    below = descendants(monitor)
    every = {monitor, *below, *cgroup_mates(monitor)}
    return Footprint(
        pss_kib(monitor), sum(pss_kib(p) for p in below), sum(pss_kib(p) for p in every)
    )


def idle_footprints(running_monitors: Callable[[], list[int]]) -> list[Footprint]:
    """Each container's footprint after an idle spell, every one checked running first."""
    time.sleep(IDLE_SECONDS)  # idle: let the guests settle (a measurement interval, not a wait)
    return [footprint(pid) for pid in running_monitors()]


def cli_memory(work: Path, mode: str, env: dict[str, str], count: int) -> list[Footprint]:
    bundle = write_bundle(work / "mem-bundle", default_config(["sleep", "100000"]))
    root = str(work / f"mem-root-{mode.replace(' ', '-')}")
    ids = [f"m{n}" for n in range(count)]
    try:
        for cid in ids:
            cli(BONNEVILLE, root, env, "create", "--bundle", str(bundle), cid)
            cli(BONNEVILLE, root, env, "start", cid)
        return idle_footprints(lambda: [cli_running_pid(BONNEVILLE, root, env, c) for c in ids])
    finally:
        for cid in ids:
            cli_delete(BONNEVILLE, root, env, cid)


def docker_memory(docker: Docker, counts: tuple[int, ...]) -> dict[int, list[Footprint]]:
    """Footprints with ``counts[0]`` containers running, then more started up to each next."""
    names: list[str] = []
    found: dict[int, list[Footprint]] = {}
    try:
        for count in counts:
            while len(names) < count:
                names.append(f"bvbench-mem-{len(names)}")
                docker_start(docker, "bonneville", names[-1])
            found[count] = idle_footprints(lambda: [docker_running_pid(docker, n) for n in names])
    finally:
        if names:
            docker("rm", "-f", *names)
    return found


def memory_row(
    path: str, mode: str, count: int, footprints: list[Footprint] | str
) -> tuple[list[str], Figure]:
    """A table row of medians over the containers, and the figure a memory target reads."""
    if isinstance(footprints, str):
        return [path, mode, str(count), footprints, "–", "–"], Figure(None, footprints)

    def mib(kib: list[int]) -> float:
        return statistics.median(kib) / 1024

    total = mib([f.total for f in footprints])
    vm, monitor = mib([f.vm for f in footprints]), mib([f.monitor for f in footprints])
    row = [path, mode, str(count), f"{total:.1f} MiB", f"{vm:.1f} MiB", f"{monitor:.1f} MiB"]
    return row, Figure(total, f"{total:.1f} MiB (QEMU {vm:.1f}, monitor {monitor:.1f})")


def bench_memory(
    docker: Docker,
    work: Path,
    cli_count: int = CLI_MEMORY_COUNT,
    docker_counts: tuple[int, ...] = DOCKER_MEMORY_COUNTS,
) -> Section:
    rows, figures = [], {}
    for mode, env in (("clone", {}), ("cold boot", {"BONNEVILLE_CLONE": "0"})):
        try:
            footprints: list[Footprint] | str = cli_memory(work, mode, env, cli_count)
        except MEASUREMENT_ERRORS as exc:
            footprints = why(exc)
        row, figure = memory_row("CLI", mode, cli_count, footprints)
        rows.append(row)
        if mode == "clone":
            figures["memory-cli"] = figure
    try:
        found: dict[int, list[Footprint] | str] = {**docker_memory(docker, docker_counts)}
    except MEASUREMENT_ERRORS as exc:
        found = dict.fromkeys(docker_counts, why(exc))
    for count, footprints in found.items():
        row, figures[f"memory-docker-{count}"] = memory_row("docker", "clone", count, footprints)
        rows.append(row)
    heading = (
        f"### memory per idle container (PSS from smaps_rollup after {IDLE_SECONDS} s idle, "
        "median over the containers)"
    )
    headers = ["path", "start", "running", "monitor + QEMU + exec proxies", "QEMU", "monitor"]
    return Section(f"{heading}\n\n{table(headers, rows)}", figures)


# ---- concurrent docker run -------------------------------------------------------------------


def concurrent_batch(
    docker: Docker, runtime: str, count: int, errors: list[str]
) -> dict[str, float]:
    """``count`` `docker run --rm … echo N` at once, each checked to exit 0 and print N."""

    def one(n: int) -> str | None:
        try:
            result = docker("run", "--rm", "--runtime", runtime, IMAGE, "echo", str(n), timeout=600)
        except subprocess.TimeoutExpired as exc:
            return why(exc)
        if result.returncode == 0 and result.stdout.strip() == str(n).encode():
            return None
        return why(
            subprocess.CalledProcessError(result.returncode, "docker run", stderr=result.stderr)
        )

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        failures = [outcome for outcome in pool.map(one, range(count)) if outcome is not None]
    total = time.perf_counter() - start
    errors += failures
    return {"total": total, "failures": float(len(failures))}


def bench_concurrent(docker: Docker, runs: int, count: int = CONCURRENT) -> Section:
    # No warm-up round: each is heavy, and the median absorbs a cold first one.
    errors: dict[str, list[str]] = {"runc": [], "bonneville": []}
    results = interleaved(
        runs,
        {r: functools.partial(concurrent_batch, docker, r, count, errors[r]) for r in errors},
        warmup=False,
    )
    base = median(results["runc"], "total")
    rows = []
    for runtime, result in results.items():
        failures = (
            result
            if isinstance(result, str)
            else f"{sum(result['failures']):.0f} of {count * runs}"
        )
        rows.append([runtime, *seconds(median(result, "total"), base), failures])
    text = f"### {count} `docker run --rm … echo N` at once (median of {rounds(runs)})\n\n"
    text += table(["runtime", "total time", "vs runc", "failed"], rows)
    first = next((e for es in errors.values() for e in es), "")
    if first:
        text += f"\n\nFirst failure: {first}"
    bonneville = results["bonneville"]
    if isinstance(bonneville, str):
        figure = Figure(None, bonneville)
    else:
        failed = sum(bonneville["failures"])
        total = statistics.median(bonneville["total"])
        against = f", {ratio(total, base)} runc's {base:.1f} s" if isinstance(base, float) else ""
        figure = Figure(
            failed,
            f"{count * runs - failed:.0f} of {count * runs} succeeded ({runs} rounds of {count}); "
            f"median {total:.1f} s{against}",
        )
    return Section(text, {"concurrent": figure})


# ---- storage ---------------------------------------------------------------------------------

# Busybox has no fine monotonic clock a shell can read (`date` has no %N, /proc/uptime ticks
# every 10 ms), but `adjtimex` prints the wall clock in µs. Three stamps: the first two measure
# what a stamp itself costs (a fork and exec, worth milliseconds in an emulated guest), taken
# off the work's span between the last two. /proc/uptime, monotonic, brackets them all: were
# the wall clock stepped meanwhile, its coarser span stands instead.
STAMPED = (
    "cd {directory} && read a x < /proc/uptime && adjtimex && adjtimex && "
    '{{ {work}; }} >/dev/null && adjtimex && read b x < /proc/uptime && echo "uptime $a $b"'
)
_STAMP = re.compile(r"time\.tv_sec:\s*(\d+)\s+time\.tv_usec:\s*(\d+)")
_UPTIME = re.compile(r"^uptime ([\d.]+) ([\d.]+)$", re.MULTILINE)

STORAGE_STEPS = {
    "write": (f"write {IO_MIB} MiB (dd bs=1M)", f"dd if=/dev/zero of=big bs=1M count={IO_MIB}"),
    "small": (
        f"create {SMALL_FILES:,} small files",
        f"mkdir small && cd small && for i in $(seq {SMALL_FILES}); do echo x > f$i; done",
    ),
    "unpack": (
        f"unpack a {TREE_DIRS * TREE_FILES_PER_DIR:,}-file tree (tar)",
        "mkdir tree && tar -xf /src/tree.tar -C tree",
    ),
    "read": (f"read {IO_MIB} MiB (dd bs=1M), fresh container", "dd if=big of=/dev/null bs=1M"),
}
PLACES = {"rootfs": "/bench", "bind": "/vol"}  # the container's root, a -v host directory


def make_tree_tar(path: Path) -> Path:
    """A tar of a generated tree of small files (ustar, which busybox tar reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for d in range(TREE_DIRS):
            info = tarfile.TarInfo(f"d{d}")
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, now
            tar.addfile(info)
            for n in range(TREE_FILES_PER_DIR):
                data = f"file {n} of directory {d}\n".encode()
                info = tarfile.TarInfo(f"d{d}/f{n}")
                info.size, info.mode, info.mtime = len(data), 0o644, now
                tar.addfile(info, io.BytesIO(data))
    return path


def stamped_elapsed(stdout: str) -> float:
    stamps = [int(s) + int(us) / 1e6 for s, us in _STAMP.findall(stdout)]
    uptime = _UPTIME.search(stdout)
    if len(stamps) != 3 or uptime is None:
        raise Failed(f"unexpected output of a timed step: {stdout[-300:]!r}")
    coarse = float(uptime[2]) - float(uptime[1])
    if abs((stamps[2] - stamps[0]) - coarse) > 0.05:
        return coarse
    return (stamps[2] - stamps[1]) - (stamps[1] - stamps[0])


def exec_timed(docker: Docker, name: str, directory: str, work: str) -> float:
    """``work`` run by `docker exec` in ``directory``, timed inside the container."""
    script = STAMPED.format(directory=directory, work=work)
    result = docker("exec", name, "sh", "-c", script, timeout=600)
    if result.returncode:
        raise Failed(result.stderr.decode(errors="replace") or f"exit status {result.returncode}")
    return stamped_elapsed(result.stdout.decode(errors="replace"))


def storage_round(docker: Docker, runtime: str, work: Path, source: Path) -> dict[str, float]:
    """Every step in the rootfs and in a bind volume of one container; the reads after a restart,
    so that they start from a fresh container (for bonneville a new VM, its page cache empty;
    for both runtimes the host's page cache still holds the file)."""
    name = f"bvbench-io-{runtime}"
    volume = work / "io-volume" / runtime
    shutil.rmtree(volume, ignore_errors=True)
    volume.mkdir(parents=True)
    figures: dict[str, float] = {}
    try:
        docker_start(docker, runtime, name, "-v", f"{volume}:/vol", "-v", f"{source}:/src:ro")
        docker.ok("exec", name, "mkdir", PLACES["rootfs"])
        for step in ("write", "small", "unpack"):
            for place, directory in PLACES.items():
                figures[f"{step} {place}"] = exec_timed(
                    docker, name, directory, STORAGE_STEPS[step][1]
                )
        docker.ok("restart", "-t", "0", name)
        docker_running_pid(docker, name)
        for place, directory in PLACES.items():
            figures[f"read {place}"] = exec_timed(docker, name, directory, STORAGE_STEPS["read"][1])
    finally:
        docker("rm", "-f", name)
        shutil.rmtree(volume, ignore_errors=True)
    return figures


def throughput(value: float | str) -> str:
    return value if isinstance(value, str) else f"{value:.2f} s ({IO_MIB / value:.0f} MiB/s)"


def bench_io(docker: Docker, work: Path, runs: int) -> Section:
    source = make_tree_tar(work / "io-source" / "tree.tar").parent
    # No warm-up round: each is heavy, and the median absorbs a cold first one.
    results = interleaved(
        runs,
        {
            r: functools.partial(storage_round, docker, r, work, source)
            for r in ("runc", "bonneville")
        },
        warmup=False,
    )
    rows, figures = [], {}
    for step, (wording, _) in STORAGE_STEPS.items():
        for place in PLACES:
            key = f"{step} {place}"
            runc, ours = median(results["runc"], key), median(results["bonneville"], key)
            show = throughput if step in ("write", "read") else duration
            against = (
                ratio(ours, runc) if isinstance(ours, float) and isinstance(runc, float) else "–"
            )
            rows.append([wording, place, show(runc), show(ours), against])
            figures.update(storage_figure(step, place, runc, ours))
    heading = (
        f"### storage: the container's rootfs and a bind volume (median of {rounds(runs)}, "
        "timed inside the container)"
    )
    headers = ["operation", "where", "runc", "bonneville", "bonneville vs runc"]
    return Section(f"{heading}\n\n{table(headers, rows)}", figures)


def storage_figure(
    step: str, place: str, runc: float | str, ours: float | str
) -> dict[str, Figure]:
    """The figure a storage target reads, if one reads this step."""
    if step not in ("write", "read", "small"):
        return {}
    key = f"{step}-{place}"
    if isinstance(ours, str) or isinstance(runc, str):
        return {key: Figure(None, ours if isinstance(ours, str) else f"runc {runc}")}
    if step == "small":
        return {key: Figure(ours / runc, f"{ours / runc:.1f}× ({ours:.2f} s vs {runc:.2f} s)")}
    share = runc / ours  # throughputs' ratio: the same bytes in both
    return {
        key: Figure(
            share, f"{share:.0%} ({IO_MIB / ours:.0f} MiB/s vs runc's {IO_MIB / runc:.0f} MiB/s)"
        )
    }


# ---- a Kubernetes pod ------------------------------------------------------------------------


def bench_pod(work: Path, runs: int) -> Section:
    """A Kubernetes pod's start through containerd's CRI (a private containerd, as the CRI
    tests start it): RunPodSandbox, then CreateContainer + StartContainer of one container, as
    kubelet asks; and the pod's removal (StopPodSandbox + RemovePodSandbox)."""
    from integration.cri import CriClient, Pods, make_images, private_containerd

    names = itertools.count()
    with private_containerd(make_images(work / "cri-images")) as daemon:
        client = CriClient(daemon.endpoint)

        def cycle(pods: Pods) -> dict[str, float]:
            began = time.perf_counter()
            pod = pods.pod(f"bench-{pods.handler}-{next(names)}")
            pods.container(pod, "app", ["sleep", "3600"])
            started = time.perf_counter()
            client.stop_pod_sandbox(pod.id)
            client.remove_pod_sandbox(pod.id)
            return {"start": started - began, "stop": time.perf_counter() - started}

        try:
            results = interleaved(
                runs,
                {
                    handler: functools.partial(
                        cycle, Pods(client, daemon, handler, work / "pod-logs" / handler)
                    )
                    for handler in ("runc", "bonneville")
                },
            )
        finally:
            client.close()
    base = {key: median(results["runc"], key) for key in ("start", "stop")}
    rows = [
        [
            handler,
            *seconds(median(r, "start"), base["start"]),
            *seconds(median(r, "stop"), base["stop"]),
        ]
        for handler, r in results.items()
    ]
    heading = f"### a Kubernetes pod through containerd's CRI (median of {rounds(runs)})"
    headers = ["handler", "pod start (runp + create + start)", "×runc", "stopp + rmp", "×runc"]
    return Section(f"{heading}\n\n{table(headers, rows)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=CHECK_ROUNDS, help="rounds per median")
    parser.add_argument("--only", default=",".join(SECTIONS), help="sections, comma-separated")
    parser.add_argument("--check", action="store_true", help="end with the targets, met or not")
    args = parser.parse_args()
    only = set(args.only.split(","))
    if only - set(SECTIONS):
        parser.error(f"unknown sections: {', '.join(sorted(only - set(SECTIONS)))}")
    if os.geteuid() != 0:
        sys.exit("bench.py: run as root")
    use_checkout_launcher()  # this checkout's code, whichever checkout install.sh installed
    subprocess.run(["bonneville", "template", "build"], check=True, capture_output=True)
    figures: dict[str, Figure] = {}

    def show(section: Section) -> None:
        print(section.text + "\n", flush=True)
        figures.update(section.figures)

    runsc = runsc_args() if shutil.which("runsc") else []
    with tempfile.TemporaryDirectory(prefix="bvbench-") as tmp:
        work = Path(tmp)
        print(f"## Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
        print(f"Machine: {machine(accelerator(work))}\n", flush=True)
        if only & DOCKERD_SECTIONS:
            with cold_wrapper() as cold:
                runtimes = docker_runtimes(cold, runsc)
                with private_dockerd(runtimes, IMAGE) as docker:
                    if "docker" in only:
                        show(bench_docker(docker, ["runc", *runtimes], args.runs, runsc))
                    if "concurrent" in only:
                        show(bench_concurrent(docker, args.runs))
                    if "memory" in only:
                        show(bench_memory(docker, work))
                    if "io" in only:
                        show(bench_io(docker, work, args.runs))
        if "cli" in only:
            show(bench_cli(work, args.runs, runsc))
        if "pod" in only:
            show(bench_pod(work, args.runs))
    if args.check:
        print(check(figures), flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Run the OCI runtime-tools validation suite against runc and bonneville; print the table.

    python3 benchmarks/conformance.py                      # every test, runc and bonneville
    python3 benchmarks/conformance.py --tests create,kill  # a few
    python3 benchmarks/conformance.py --runtimes bonneville --bonneville /path/to/bonneville

The suite is fetched (git clone of github.com/opencontainers/runtime-tools, or a local mirror
named by --mirror) at commit 28f43fa, the last one that builds with Debian 12's Go 1.19, into
--src (default /tmp/bonneville-runtime-tools, never inside this repository), and built offline
from its vendored dependencies. Each test binary runs from that directory (it unpacks
rootfs-amd64.tar.gz and copies runtimetest from there) with RUNTIME set; its TAP output is kept
under --out. Bonneville runs with its own --root, so the run never sees other containers.
The `bonneville` tested is this checkout's (a launcher written as the tests write theirs,
tests/support.py), unless --bonneville names another. Standard library and this repository
only; run as root (runc and bonneville need it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

COMMIT = "28f43fa"
UPSTREAM = "https://github.com/opencontainers/runtime-tools"
# Tests that exercise features a runc-compatible runtime on cgroup v1 must have; the cgroup
# tests are run too, they are just not part of the lifecycle set the issue names.
LIFECYCLE = [
    "create",
    "start",
    "state",
    "kill",
    "kill_no_effect",
    "killsig",
    "delete",
    "pidfile",
    "hooks",
    "hooks_stdin",
    "prestart",
    "prestart_fail",
    "poststart",
    "poststart_fail",
    "poststop",
    "poststop_fail",
    "misc_props",
    "process",
    "process_user",
    "hostname",
    "mounts",
    "root_readonly_true",
    "linux_masked_paths",
    "linux_readonly_paths",
    "process_rlimits",
    "process_rlimits_fail",
    "default",
]


@dataclass
class Result:
    test: str
    runtime: str
    status: str  # pass | fail | skip | error | timeout
    passed: int
    failed: int
    skipped: int
    planned: int
    seconds: float
    note: str  # first failing line or error, for the table

    def cell(self) -> str:
        if self.status == "pass":
            return f"pass ({self.passed})" if self.passed > 1 else "pass"
        if self.status == "skip":
            return "skip"
        if self.status == "fail":
            return f"**fail** {self.failed}/{self.passed + self.failed}"
        return f"**{self.status}**"


def fetch(src: str, mirror: str | None) -> None:
    if os.path.exists(os.path.join(src, "Makefile")):
        return
    os.makedirs(src, exist_ok=True)
    if mirror:
        archive = subprocess.run(
            ["git", f"--git-dir={mirror}", "archive", COMMIT], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
        return
    tmp = src + ".git"
    subprocess.run(["git", "clone", "--quiet", UPSTREAM, tmp], check=True)
    subprocess.run(f"git -C {tmp} archive {COMMIT} | tar -x -C {src}", shell=True, check=True)
    shutil.rmtree(tmp)


def build(src: str) -> None:
    if os.path.exists(os.path.join(src, "runtimetest")) and os.path.exists(
        os.path.join(src, "validation", "create", "create.t")
    ):
        return
    env = dict(os.environ, GOFLAGS="-mod=vendor", GOPROXY="off", GOTOOLCHAIN="local")
    subprocess.run(["make", "runtimetest", "validation-executables"], cwd=src, env=env, check=True)


def tests_in(src: str) -> list[str]:
    root = os.path.join(src, "validation")
    return sorted(
        name for name in os.listdir(root) if os.path.exists(os.path.join(root, name, name + ".t"))
    )


_OK = re.compile(r"^(not ok|ok)\b(.*)$")
_PLAN = re.compile(r"^1\.\.(\d+)")


def parse_tap(
    test: str, runtime: str, text: str, rc: int | None, seconds: float, stderr: str = ""
) -> Result:
    passed = failed = skipped = 0
    planned = -1
    note = ""
    stderr_lines = [line for line in stderr.splitlines() if line.strip()]
    stderr_line = stderr_lines[-1] if stderr_lines else ""
    for line in text.splitlines():
        m = _OK.match(line)
        if m:
            directive = m.group(2)
            if "# SKIP" in directive.upper():
                skipped += 1
            elif m.group(1) == "ok":
                passed += 1
            else:
                failed += 1
                note = note or m.group(2).strip(" -")
            continue
        m = _PLAN.match(line)
        if m:
            planned = int(m.group(1))
    found = re.search(r'"error": "([^"]+)"', text)
    if rc is None:
        status = "timeout"
    elif planned <= 0 and passed + failed + skipped == 0:
        # Two kinds of test print no results: those that emit "1..0" plus an error diagnostic
        # when something is wrong (hooks, prestart...), and those that print nothing and exit
        # 1 on failure (process_rlimits_fail).
        if found or rc != 0:
            status = "fail"
            failed = 1
            note = found.group(1).split("\\n")[0] if found else f"exit {rc}: {stderr_line}"
        else:
            status = "pass"
            passed = 1
    elif failed:
        status = "fail"
    elif passed == 0 and skipped:
        status = "skip"
    elif rc != 0 or passed + skipped < planned:
        status = "error"
        note = note or f"exit {rc}, {passed + skipped} of {planned} ran: {stderr_line}"
    else:
        status = "pass"
    return Result(test, runtime, status, passed, failed, skipped, planned, seconds, note)


def wrapper_for_bonneville(out: str, binary: str, root: str) -> str:
    """runtime-tools runs $RUNTIME with runc's arguments only: add our own --root."""
    path = os.path.join(out, "bonneville-runtime")
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\nexec {binary} --root {root} "$@"\n')
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def run_one(src: str, out: str, test: str, runtime: str, command: str, timeout: float) -> Result:
    os.makedirs(os.path.join(out, runtime), exist_ok=True)
    binary = os.path.join(src, "validation", test, test + ".t")
    env = dict(os.environ, RUNTIME=command)
    started = time.monotonic()
    rc: int | None
    try:
        proc = subprocess.run(
            [binary], cwd=src, env=env, capture_output=True, timeout=timeout, check=False
        )
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, stdout, stderr = None, exc.stdout or b"", exc.stderr or b""
    seconds = time.monotonic() - started
    base = os.path.join(out, runtime, test)
    with open(base + ".tap", "wb") as f:
        f.write(stdout)
    with open(base + ".err", "wb") as f:
        f.write(stderr)
    with open(base + ".rc", "w") as f:
        f.write("timeout\n" if rc is None else f"{rc}\n")
    return parse_tap(
        test,
        runtime,
        stdout.decode(errors="replace"),
        rc,
        seconds,
        stderr.decode(errors="replace"),
    )


def reparse(out: str, test: str, runtime: str) -> Result | None:
    """The result of an earlier run, from the files run_one kept."""
    base = os.path.join(out, runtime, test)
    try:
        with open(base + ".tap", "rb") as f:
            text = f.read().decode(errors="replace")
        with open(base + ".err", "rb") as f:
            err = f.read().decode(errors="replace")
        with open(base + ".rc") as f:
            code = f.read().strip()
    except FileNotFoundError:
        return None
    rc = None if code == "timeout" else int(code)
    return parse_tap(test, runtime, text, rc, 0.0, err)


def table(results: list[Result], runtimes: list[str]) -> str:
    by = {(r.test, r.runtime): r for r in results}
    tests = sorted({r.test for r in results}, key=lambda t: (t not in LIFECYCLE, t))
    lines = [
        "| test | " + " | ".join(runtimes) + " | bonneville's first failure |",
        "| --- | " + " | ".join("---" for _ in runtimes) + " | --- |",
    ]
    for test in tests:
        cells = [by[(test, rt)].cell() if (test, rt) in by else "" for rt in runtimes]
        bonneville = by.get((test, "bonneville"))
        note = bonneville.note if bonneville and bonneville.status != "pass" else ""
        name = f"{test}" if test in LIFECYCLE else f"{test} (extra)"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {note.replace('|', '/')} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", default="/tmp/bonneville-runtime-tools")
    parser.add_argument("--mirror", help="a bare git repository of runtime-tools to use")
    parser.add_argument("--out", default="/tmp/bonneville-conformance")
    parser.add_argument("--runtimes", default="runc,bonneville")
    parser.add_argument("--bonneville", help="the CLI to test (default: this checkout's)")
    parser.add_argument("--root", default="/run/bonneville-conformance")
    parser.add_argument("--tests", help="comma-separated names (default: all)")
    parser.add_argument("--timeout", type=float, default=900.0, help="per test binary")
    parser.add_argument(
        "--table-only", action="store_true", help="print the table of the runs kept in --out"
    )
    args = parser.parse_args()
    runtimes = args.runtimes.split(",")
    if args.table_only:
        names = sorted(
            {n.rsplit(".", 1)[0] for rt in runtimes for n in os.listdir(os.path.join(args.out, rt))}
        )
        kept = [reparse(args.out, t, rt) for t in names for rt in runtimes]
        print(table([r for r in kept if r is not None], runtimes))
        return 0

    if not args.bonneville:
        # This checkout's code, whatever install.sh last installed on PATH.
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from tests.support import use_checkout_launcher

        args.bonneville = str(use_checkout_launcher())
    src = os.path.abspath(args.src)
    fetch(src, args.mirror)
    build(src)
    os.makedirs(args.out, exist_ok=True)
    commands = {
        "runc": shutil.which("runc") or "runc",
        "bonneville": wrapper_for_bonneville(args.out, args.bonneville, args.root),
    }
    tests = args.tests.split(",") if args.tests else tests_in(src)
    results: list[Result] = []
    results_path = os.path.join(args.out, "results.json")
    for test in tests:
        for runtime in runtimes:
            result = run_one(src, args.out, test, runtime, commands[runtime], args.timeout)
            results.append(result)
            print(
                f"{test:34} {runtime:11} {result.status:8} {result.passed:3} ok "
                f"{result.failed:3} not ok {result.seconds:6.1f}s {result.note[:60]}",
                file=sys.stderr,
                flush=True,
            )
            with open(results_path, "w") as f:
                json.dump([asdict(r) for r in results], f, indent=1)
    print(table(results, runtimes))
    return 0


if __name__ == "__main__":
    sys.exit(main())

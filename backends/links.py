"""Host network links through `ip -batch` and `tc -batch`: one process for many changes.

The monitor's taps (shim/network.py) and the libvirt backend's links into the host
(backends/libvirt/hostnet.py) are made, mirrored and deleted with these; each process start is
milliseconds of a container's create.
"""

from __future__ import annotations

import subprocess

from bonneville.spec.errors import BonnevilleError

_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


def mirror_commands(a: str, b: str) -> list[str]:
    """`tc -batch` lines by which every frame arriving on ``a`` leaves through ``b`` and back
    (ingress qdiscs with redirects)."""
    commands = []
    for src, dst in ((a, b), (b, a)):
        commands.append(f"qdisc add dev {src} ingress")
        commands.append(
            f"filter add dev {src} parent ffff: protocol all u32 match u8 0 0"
            f" action mirred egress redirect dev {dst}"
        )
    return commands


def batch(tool: str, commands: list[str], netns: str | None = None) -> None:
    """Run ``tool -batch -`` (ip or tc) over these command lines, in the network namespace at
    path ``netns`` if given; the first failure raises."""
    if not commands:
        return
    result = run_batch(tool, commands, netns)
    if result.returncode != 0:
        raise batch_error(tool, result)


def batch_error(tool: str, result: subprocess.CompletedProcess[str]) -> BonnevilleError:
    """The error of a failed batch: the tool's complaints on one line."""
    detail = "; ".join(line.strip() for line in result.stderr.splitlines() if line.strip())
    return BonnevilleError(f"{tool}: {detail}")


def delete_links(names: list[str], netns: str | None = None) -> list[str]:
    """Delete these links, in this order, with one `ip` process (in the network namespace at
    path ``netns`` if given), going on past failures; what went wrong, one line each, other
    than a link that is not there."""
    if not names:
        return []
    result = run_batch("ip", [f"link del dev {name}" for name in names], netns, force=True)
    return [
        line.strip()
        for line in result.stderr.splitlines()
        if line.strip()
        and "Cannot find device" not in line
        and not line.startswith("Command failed")
    ]


def run_batch(
    tool: str, commands: list[str], netns: str | None, force: bool = False
) -> subprocess.CompletedProcess[str]:
    """``tool [-force] -batch -`` over these command lines (in the network namespace at path
    ``netns`` if given), its result unchecked."""
    argv = [tool, *(["-force"] if force else []), "-batch", "-"]
    if netns is not None:
        argv = ["nsenter", f"--net={netns}", *argv]
    return subprocess.run(
        argv,
        input="\n".join(commands) + "\n",
        capture_output=True,
        text=True,
        env=_ENV,
        close_fds=True,
        check=False,
    )

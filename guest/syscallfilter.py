"""A container's seccomp profile (OCI ``linux.seccomp``) as a kernel filter, through libseccomp.

The profile is the config's, as docker, containerd and CRI-O resolve it (docker's default, a
Kubernetes ``RuntimeDefault`` or ``Localhost`` profile): a default action, architectures, and
rules of syscall names, an action and argument conditions. libseccomp's Python bindings
(Debian's python3-seccomp) compile it, as runc's libseccomp-golang does. Names this kernel or
libseccomp does not know are skipped, as runc skips them. Standard library plus that extension:
the image builder packs it (backends/image/python.py, GUEST_EXTENSIONS).
"""

from __future__ import annotations

import errno
import sys

from bonneville.guest.common import Refused

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# Where Debian installs the bindings: the agent in host mode (fake backend, tests) runs in a
# virtual environment without them on its path.
DIST_PACKAGES = "/usr/lib/python3/dist-packages"
ARCHES = {
    "SCMP_ARCH_X86": "X86",
    "SCMP_ARCH_X86_64": "X86_64",
    "SCMP_ARCH_X32": "X32",
    "SCMP_ARCH_AARCH64": "AARCH64",
    "SCMP_ARCH_ARM": "ARM",
}
OPERATORS = {
    "SCMP_CMP_NE": "NE",
    "SCMP_CMP_LT": "LT",
    "SCMP_CMP_LE": "LE",
    "SCMP_CMP_EQ": "EQ",
    "SCMP_CMP_GE": "GE",
    "SCMP_CMP_GT": "GT",
    "SCMP_CMP_MASKED_EQ": "MASKED_EQ",
}
ACTIONS = (
    "SCMP_ACT_KILL",
    "SCMP_ACT_KILL_PROCESS",
    "SCMP_ACT_KILL_THREAD",
    "SCMP_ACT_TRAP",
    "SCMP_ACT_ERRNO",
    "SCMP_ACT_TRACE",
    "SCMP_ACT_ALLOW",
    "SCMP_ACT_LOG",
)


def bindings() -> Any:
    """libseccomp's Python module."""
    try:
        import seccomp  # type: ignore[import-not-found]
    except ImportError:
        if DIST_PACKAGES in sys.path:
            raise Refused("seccomp: libseccomp's Python bindings are not installed") from None
        sys.path.append(DIST_PACKAGES)
        try:
            import seccomp
        except ImportError:
            raise Refused("seccomp: libseccomp's Python bindings are not installed") from None
    return seccomp


def preload() -> None:
    """Import the bindings now, if there are any: in a VM this runs before the template is
    saved (mode.start), so no clone pays for loading libseccomp at its first container (~70 ms of a
    clone's create under TCG, where every container of docker's has a profile)."""
    try:
        bindings()
    except Refused:
        pass  # said at the first container with a profile


def check(profile: Any) -> None:
    """Refuse (before any fork) a profile whose shape is wrong, and load libseccomp while the
    agent's own files are in reach (the container's process compiles the filter after it
    entered its root); the kernel's own checks come at load time."""
    if profile is None:
        return
    bindings()
    if not isinstance(profile, dict):
        raise Refused("linux.seccomp must be an object")
    for action in [profile.get("defaultAction"), *(r.get("action") for r in _rules(profile))]:
        if action not in ACTIONS:
            raise Refused(f"seccomp: unsupported action {action!r}")


def _rules(profile: dict[str, Any]) -> list[dict[str, Any]]:
    rules = profile.get("syscalls") or []
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise Refused("linux.seccomp.syscalls must be a list of objects")
    return rules


def _action(lib: Any, name: Any, errno_ret: Any, default_errno: int) -> Any:
    if name in ("SCMP_ACT_KILL", "SCMP_ACT_KILL_THREAD"):
        return lib.KILL
    if name == "SCMP_ACT_KILL_PROCESS":
        return lib.KILL_PROCESS
    if name == "SCMP_ACT_TRAP":
        return lib.TRAP
    if name == "SCMP_ACT_ERRNO":
        return lib.ERRNO(int(errno_ret) if errno_ret is not None else default_errno)
    if name == "SCMP_ACT_TRACE":
        return lib.TRACE(int(errno_ret) if errno_ret is not None else default_errno)
    if name == "SCMP_ACT_ALLOW":
        return lib.ALLOW
    if name == "SCMP_ACT_LOG":
        return lib.LOG
    raise Refused(f"seccomp: unsupported action {name!r}")


def build(profile: dict[str, Any]) -> Any:
    """The profile as a libseccomp filter, ready to load."""
    lib = bindings()
    default_errno = int(profile.get("defaultErrnoRet") or errno.EPERM)
    default = _action(lib, profile.get("defaultAction"), profile.get("defaultErrnoRet"), 1)
    flt = lib.SyscallFilter(default)
    # libseccomp sets no_new_privs when it loads a filter unless told not to; runc does not
    # (process.noNewPrivileges decides, and a root process may load without it).
    flt.set_attr(lib.Attr.CTL_NNP, 0)
    for arch in profile.get("architectures") or []:
        name = ARCHES.get(str(arch))
        if name is None:
            continue
        try:
            flt.add_arch(getattr(lib.Arch, name))
        except Exception:
            pass  # already there (the native one), or one libseccomp does not know
    for rule in _rules(profile):
        action = _action(lib, rule.get("action"), rule.get("errnoRet"), default_errno)
        if action == default:
            continue  # libseccomp refuses rules that repeat the default action
        args = [
            lib.Arg(
                int(a["index"]),
                getattr(lib, OPERATORS[str(a["op"])]),
                int(a.get("value") or 0),
                int(a.get("valueTwo") or 0),
            )
            for a in rule.get("args") or []
            if str(a.get("op")) in OPERATORS
        ]
        for name in rule.get("names") or []:
            try:
                flt.add_rule(action, str(name), *args)
            except (RuntimeError, ValueError, OSError):
                continue  # a syscall this kernel or libseccomp does not know, as runc skips it
    return flt


def load(flt: Any) -> None:
    """Install the filter on this process (inherited by whatever it execs)."""
    try:
        flt.load()
    except (RuntimeError, OSError) as exc:
        raise OSError(errno.EINVAL, f"loading the seccomp filter: {exc}") from exc

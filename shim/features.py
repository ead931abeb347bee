"""The runtime-spec "features document" (`bonneville features`), telling the truth about Bonneville.

What it claims, and why:

- ``ociVersionMin``/``ociVersionMax``: 1.0.0 to 1.1.0. We load any 1.x config (unknown
  properties are ignored, as the spec requires), but we implement the 1.1 text. The spec says the
  document MUST NOT hold properties newer than ``ociVersionMax``, so ``mountExtensions`` (added
  in 1.2.0) is left out; we do not implement id-mapped mounts anyway.
- ``hooks``: all six; the shim runs them on the host with the state on stdin. createContainer and
  startContainer also run on the host: the container namespace is inside the VM, where there is
  no copy of the hook binaries.
- ``mountOptions``: the runtime-spec's Linux table minus ``tmpcopyup``; the guest agent passes
  them to mount(2)/mount_setattr(2) in the guest kernel.
- ``linux.namespaces``: every type is accepted in config.json. ``network`` (with or without a
  path) is honoured on the host side, where the monitor lives and the VM's NIC is plumbed; the
  others are implicit, because the VM isolates processes, IPC, mounts, hostname, cgroups, users
  and clocks from the host far more strongly than a namespace would.
- ``linux.capabilities``: every capability the guest kernel (Linux 6.1) knows, because the agent
  applies the process's sets inside the guest.
- ``cgroup``: v1, v2 and systemd: the container's host processes (monitor, QEMU, exec proxies)
  are placed where ``cgroupsPath`` says, as runc's managers place a container, and bounded by
  the VM's size (shim/cgroups/); the container's own limits apply inside the VM. Not the
  user-scoped systemd manager (no rootless mode), not RDMA.
- ``seccomp``: applied by the agent inside the guest through libseccomp (guest/syscallfilter.py),
  to the container's processes and its exec'd ones: the actions, operators and architectures
  it compiles.
- ``apparmor``, ``selinux``, ``intelRdt``: not implemented, so ``enabled: false``.
"""

from __future__ import annotations

from typing import Any

from bonneville.guest import protocol
from bonneville.spec.defaults import OCI_VERSION

OCI_VERSION_MIN = "1.0.0"
OCI_VERSION_MAX = OCI_VERSION

# Backends this build ships, named in an annotation so callers can tell what will run their VMs.
BACKENDS = ("qemu",)

# What guest/syscallfilter.py compiles (libseccomp's names).
SECCOMP_ACTIONS = (
    "SCMP_ACT_ALLOW",
    "SCMP_ACT_ERRNO",
    "SCMP_ACT_KILL",
    "SCMP_ACT_KILL_PROCESS",
    "SCMP_ACT_KILL_THREAD",
    "SCMP_ACT_LOG",
    "SCMP_ACT_TRACE",
    "SCMP_ACT_TRAP",
)
SECCOMP_OPERATORS = (
    "SCMP_CMP_EQ",
    "SCMP_CMP_GE",
    "SCMP_CMP_GT",
    "SCMP_CMP_LE",
    "SCMP_CMP_LT",
    "SCMP_CMP_MASKED_EQ",
    "SCMP_CMP_NE",
)
SECCOMP_ARCHS = ("SCMP_ARCH_X86", "SCMP_ARCH_X86_64", "SCMP_ARCH_X32")

HOOKS = (
    "prestart",
    "createRuntime",
    "createContainer",
    "startContainer",
    "poststart",
    "poststop",
)

# runtime-spec 1.1 config.md "Linux mount options", without tmpcopyup (a runc/crun extension
# that copies a directory's contents into a fresh tmpfs; our agent does not do it).
MOUNT_OPTIONS = (
    "async",
    "atime",
    "bind",
    "defaults",
    "dev",
    "diratime",
    "dirsync",
    "exec",
    "iversion",
    "lazytime",
    "loud",
    "mand",
    "noatime",
    "nodev",
    "nodiratime",
    "noexec",
    "noiversion",
    "nolazytime",
    "nomand",
    "norelatime",
    "nostrictatime",
    "nosuid",
    "nosymfollow",
    "private",
    "ratime",
    "rbind",
    "rdev",
    "rdiratime",
    "relatime",
    "remount",
    "rexec",
    "rnoatime",
    "rnodiratime",
    "rnoexec",
    "rnorelatime",
    "rnostrictatime",
    "rnosuid",
    "rnosymfollow",
    "ro",
    "rprivate",
    "rrelatime",
    "rro",
    "rrw",
    "rshared",
    "rslave",
    "rstrictatime",
    "rsuid",
    "rsymfollow",
    "runbindable",
    "rw",
    "shared",
    "silent",
    "slave",
    "strictatime",
    "suid",
    "symfollow",
    "sync",
    "unbindable",
)

NAMESPACES = ("cgroup", "ipc", "mount", "network", "pid", "time", "user", "uts")

# What the guest agent can apply (shared with it through the protocol module).
CAPABILITIES = protocol.CAPABILITIES


def _version() -> str:
    # importlib.metadata is only paid for by `features`, never by the hot commands.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bonneville")
    except PackageNotFoundError:
        return "unknown"


def features() -> dict[str, Any]:
    """A fresh features document (runtime-spec features.md) describing this runtime."""
    return {
        "ociVersionMin": OCI_VERSION_MIN,
        "ociVersionMax": OCI_VERSION_MAX,
        "hooks": list(HOOKS),
        "mountOptions": list(MOUNT_OPTIONS),
        "linux": {
            "namespaces": list(NAMESPACES),
            "capabilities": list(CAPABILITIES),
            "cgroup": {
                "v1": True,
                "v2": True,
                "systemd": True,
                "systemdUser": False,
                "rdma": False,
            },
            "seccomp": {
                "enabled": True,
                "actions": list(SECCOMP_ACTIONS),
                "operators": list(SECCOMP_OPERATORS),
                "archs": list(SECCOMP_ARCHS),
                "knownFlags": [],
                "supportedFlags": [],
            },
            "apparmor": {"enabled": False},
            "selinux": {"enabled": False},
            "intelRdt": {"enabled": False},
        },
        "annotations": {
            "io.github.bonneville.version": _version(),
            "io.github.bonneville.backends": ",".join(BACKENDS),
            "io.github.bonneville.isolation": "vm",
        },
    }

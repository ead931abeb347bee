"""The state store: one directory per container under --root, atomic writes, flock.

Layout of ``<root>/<id>/``:
  state.json   written only by the CLI, under the exclusive lock
  exit.json    written once by the monitor when the container's init ends
  monitor.sock the monitor's control socket
  monitor.log  the monitor's diagnostics
  share/       mount point of the container root exported to the VM
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from bonneville.backends.atomicfile import atomic_write
from bonneville.shim.ids import is_valid_id, validate_id
from bonneville.spec.errors import BonnevilleError, ContainerExists, ContainerNotFound

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

OCI_VERSION = "1.1.0"

STATE_FILE = "state.json"
EXIT_FILE = "exit.json"
SOCKET_FILE = "monitor.sock"
LOG_FILE = "monitor.log"
SHARE_DIR = "share"


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class ContainerState:
    """What the CLI records about a container; the live status is derived, never stored."""

    id: str
    bundle: str
    rootfs: str
    backend: str
    created: str = field(default_factory=now_rfc3339)
    owner: str = ""
    annotations: dict[str, str] = field(default_factory=dict)
    # The create command's own process while status is "creating" (a crashed create is stopped).
    creator_pid: int = 0
    creator_start: int | None = None
    # The monitor: the PID in --pid-file and state.pid.
    pid: int = 0
    pid_start: int | None = None
    created_done: bool = False
    started: bool = False
    paused: bool = False
    # The pod's owner whose VM this container runs in ("": the container owns its VM).
    sandbox: str = ""
    # Opaque to the core: whatever the backend needs to check on or destroy its VM (a pod
    # member's is its owner's: to check on, never to destroy).
    backend_state: dict[str, Any] = field(default_factory=dict)
    # The container's host cgroup, a directory per hierarchy (shim/cgroups/), recorded before
    # it is made so that a delete after any crash removes it; the systemd unit holding it, if
    # systemd made it; the vCPUs its CPU bound was sized for.
    cgroup: dict[str, str] = field(default_factory=dict)
    cgroup_unit: str = ""
    vm_vcpus: int = 0
    # Raw hooks from config.json as create read it, for the commands that run them later (as
    # runc keeps its config in its state): start and delete never read the bundle again.
    start_container_hooks: list[dict[str, Any]] = field(default_factory=list)
    poststart_hooks: list[dict[str, Any]] = field(default_factory=list)
    poststop_hooks: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> ContainerState:
        """The state from its JSON; ValueError if it is not what ``to_json`` wrote."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ValueError(f"{f.name} is missing")
                continue
            value = data[f.name]
            wanted = _FIELD_TYPES[str(f.type)]
            # bool is an int to Python: a state file saying "pid": true is still damaged.
            if not isinstance(value, wanted) or (isinstance(value, bool) and bool not in wanted):
                raise ValueError(f"{f.name} is {type(value).__name__}, not {f.type}")
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 1 << 63:
                raise ValueError(f"{f.name} is out of range")
            values[f.name] = value
        if not all(isinstance(v, str) for v in values.get("annotations", {}).values()):
            raise ValueError("annotations must map strings to strings")
        return cls(**values)


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "int | None": (int, type(None)),
    "bool": (bool,),
    "dict[str, str]": (dict,),
    "dict[str, Any]": (dict,),
    "list[dict[str, Any]]": (list,),
}


class Store:
    """The --root directory."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)

    def path(self, container_id: str, *parts: str) -> str:
        return os.path.join(self.root, container_id, *parts)

    def create_dir(self, container_id: str) -> str:
        """Make the container's directory; its existence is the duplicate-id check."""
        validate_id(container_id)
        os.makedirs(self.root, mode=0o711, exist_ok=True)
        directory = self.path(container_id)
        try:
            os.mkdir(directory, 0o711)
        except FileExistsError as exc:
            raise ContainerExists(container_id) from exc
        return directory

    @contextlib.contextmanager
    def lock(self, container_id: str, exclusive: bool = True, wait: bool = True) -> Iterator[None]:
        """flock the container's directory; raises ContainerNotFound if it is gone.

        ``wait=False`` (readers only): if a writer holds the lock, go on without it. A create
        holds its lock while hooks run, which may take long; `state` must still answer
        "creating" then, and every write is an atomic rename, so a reader never sees half.
        """
        validate_id(container_id)
        try:
            fd = os.open(self.path(container_id), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise ContainerNotFound(container_id) from exc
        try:
            if exclusive or wait:
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            else:
                with contextlib.suppress(BlockingIOError):
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            # A delete that held the lock before us may have removed the directory.
            if not os.path.isdir(self.path(container_id)):
                raise ContainerNotFound(container_id)
            yield
        finally:
            os.close(fd)

    def load(self, container_id: str) -> ContainerState:
        validate_id(container_id)
        try:
            with open(self.path(container_id, STATE_FILE), "rb") as f:
                data = json.load(f)
            st = ContainerState.from_json(data)
            if st.id != container_id:
                # Acting on it would touch another container's directory.
                raise ValueError(f"it names container {st.id!r}")
            return st
        except FileNotFoundError as exc:
            raise ContainerNotFound(container_id) from exc
        except (ValueError, TypeError) as exc:
            raise BonnevilleError(f"container {container_id}: damaged state file: {exc}") from exc

    def save(self, state: ContainerState) -> None:
        atomic_write(
            self.path(state.id, STATE_FILE), json.dumps(state.to_json(), indent=1).encode()
        )

    def read_exit(self, container_id: str) -> dict[str, Any] | None:
        try:
            with open(self.path(container_id, EXIT_FILE), "rb") as f:
                data = json.load(f)
        except (FileNotFoundError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def remove(self, container_id: str) -> None:
        import shutil  # here: only delete needs it (CLI start-up time)

        shutil.rmtree(self.path(container_id), ignore_errors=True)

    def ids(self) -> list[str]:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if is_valid_id(n) and os.path.isdir(self.path(n)))

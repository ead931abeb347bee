"""The monitor's control protocol, in one place for both ends.

- **Requests** (one JSON line, one JSON line back) go to the pod owner's control socket,
  ``<root>/<owner>/monitor.sock``, from the CLI (`start`, `kill`, `delete`, `pause`…), from exec
  proxies (`exec`, after which the connection carries frames, docs/protocol.md) and from a pod
  member's monitor (`join`, likewise). ``container`` names the pod's container the request is
  for; empty means the owner's own.
- **Phases** are what a monitor tells `create` over the setup channel: ``namespaces`` (its
  namespaces exist: the CLI runs the prestart hooks), then ``ready`` or ``error``.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass

from bonneville.spec.errors import BonnevilleError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


# A container whose VM (or the pod's owner) died under it ends as if killed by SIGKILL (runc's
# status for a killed container).
VM_KILLED_STATUS = 137


class Op(enum.StrEnum):
    START = "start"
    SIGNAL = "signal"
    DESTROY = "destroy"
    PAUSE = "pause"
    RESUME = "resume"
    PS = "ps"
    UPDATE = "update"
    STATS = "stats"
    EXEC = "exec"
    JOIN = "join"


class Phase(enum.StrEnum):
    NAMESPACES = "namespaces"
    READY = "ready"
    ERROR = "error"


@dataclass(frozen=True)
class Request:
    """One control request. ``signal``/``all``: SIGNAL; ``resources``: UPDATE (OCI
    ``linux.resources``); ``process``: EXEC (an OCI process); ``join``: JOIN (see
    shim/monitor/member.py)."""

    op: Op
    container: str = ""
    signal: int = 15
    all: bool = False
    resources: dict[str, Any] | None = None
    process: dict[str, Any] | None = None
    join: dict[str, Any] | None = None

    def encode(self) -> bytes:
        data = {k: v for k, v in asdict(self).items() if v not in (None, "", False)}
        data["op"] = self.op.value
        return json.dumps(data).encode() + b"\n"

    def to_json(self) -> dict[str, Any]:
        return dict(json.loads(self.encode()))

    @classmethod
    def decode(cls, data: Any) -> Request:
        """A request from its JSON; BonnevilleError naming what is wrong."""
        if not isinstance(data, dict):
            raise BonnevilleError("control request is not a JSON object")
        try:
            op = Op(str(data.get("op")))
        except ValueError:
            raise BonnevilleError(f"unknown request {data.get('op')!r}") from None
        container = data.get("container", "")
        signum = data.get("signal", 15)
        if not isinstance(container, str):
            raise BonnevilleError("control request: container must be a string")
        if not isinstance(signum, int) or isinstance(signum, bool) or not 0 <= signum < 65:
            raise BonnevilleError("control request: signal must be a signal number")
        fields: dict[str, dict[str, Any] | None] = {}
        for name in ("resources", "process", "join"):
            value = data.get(name)
            if value is not None and not isinstance(value, dict):
                raise BonnevilleError(f"control request: {name} must be a JSON object")
            fields[name] = value
        return cls(
            op=op,
            container=container,
            signal=signum,
            all=bool(data.get("all")),
            resources=fields["resources"],
            process=fields["process"],
            join=fields["join"],
        )


def phase(kind: Phase, **fields: Any) -> bytes:
    """A setup-channel message."""
    return json.dumps({"phase": kind.value, **fields}).encode() + b"\n"

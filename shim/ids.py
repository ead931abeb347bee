"""Where containers live (--root) and the names they may have. Apart from shim/state.py so
that the launcher's answer to `delete --force` of a container that is gone (shim/entry.py)
imports nothing more."""

from __future__ import annotations

import re

from bonneville.spec.errors import BonnevilleError

DEFAULT_ROOT = "/run/bonneville"

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+.-]{0,1023}$")


def is_valid_id(name: str) -> bool:
    """Whether ``name`` may be a container's id (runc's rules)."""
    return bool(_ID_RE.match(name)) and name not in (".", "..")


def validate_id(container_id: str) -> str:
    """Refuse ids that could escape --root or confuse tools (runc's rules)."""
    if not is_valid_id(container_id):
        raise BonnevilleError(
            f"invalid container id {container_id!r}: must match [A-Za-z0-9][A-Za-z0-9_+.-]*"
        )
    return container_id

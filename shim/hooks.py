"""Lifecycle hooks: run on the host with the container state JSON on stdin."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from bonneville.spec.errors import HookError

log = logging.getLogger("bonneville")


def _field(hook: Any, name: str, default: Any) -> Any:
    """Hooks come as spec dataclasses (create) or raw JSON dicts (later, from state.json)."""
    if isinstance(hook, dict):
        return hook.get(name, default)
    return getattr(hook, name, default)


def run_hooks(kind: str, hooks: Sequence[Any], state: dict[str, Any]) -> None:
    """Run ``hooks`` in order; the first failure raises HookError naming the hook."""
    if not hooks:
        return
    import subprocess  # here: most commands run no hook (CLI start-up time)

    payload = json.dumps(state).encode()
    for index, hook in enumerate(hooks):
        path = str(_field(hook, "path", ""))
        args = list(_field(hook, "args", None) or [path])
        env_list = list(_field(hook, "env", None) or [])
        timeout = _field(hook, "timeout", None)
        env = dict(e.split("=", 1) for e in env_list if "=" in e)
        try:
            proc = subprocess.run(
                args,
                executable=path,
                input=payload,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                close_fds=True,
                timeout=timeout,
                cwd="/",
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise HookError(f"{kind} hook #{index} ({path}) timed out after {timeout}s") from exc
        except OSError as exc:
            raise HookError(f"{kind} hook #{index} ({path}): {exc.strerror}") from exc
        if proc.returncode != 0:
            detail = proc.stderr.decode(errors="replace").strip().splitlines()
            why = f": {detail[-1]}" if detail else ""
            raise HookError(
                f"{kind} hook #{index} ({path}) failed with exit status {proc.returncode}{why}"
            )


def run_hooks_warn(kind: str, hooks: Sequence[Any], state: dict[str, Any]) -> None:
    """poststart/poststop: the spec says a failure is only logged; the lifecycle goes on."""
    try:
        run_hooks(kind, hooks, state)
    except HookError as exc:
        log.warning("%s", exc)

"""`bonneville events`: resource statistics of a container, read inside its VM (runc's format).

``--stats`` prints one snapshot; otherwise a stats event every ``--interval`` until the container
stops. Each line is ``{"type": "stats", "id": ID, "data": {...}}`` as runc prints it; an OOM kill
inside the VM is reported as ``{"type": "oom", "id": ID}``.
"""

from __future__ import annotations

import json
import re
import time

import click

from bonneville.shim.lifecycle import query
from bonneville.shim.lifecycle.context import Context
from bonneville.spec.errors import InvalidState
from bonneville.spec.resources import oom_kill_count, stats_from_cgroup

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")


def _seconds(text: str) -> float:
    """A Go-style duration as runc takes it: 5s, 500ms, 1m."""
    match = _DURATION.match(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise click.ClickException(f"invalid --interval {text!r} (e.g. 5s, 500ms)")
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[match.group(2) or "s"]
    return float(match.group(1)) * scale


@click.command("events")
@click.option("--interval", default="5s", show_default=True, help="time between stats events")
@click.option("--stats", "once", is_flag=True, help="print one stats event and exit")
@click.argument("container_id")
@click.pass_obj
def events(ctx: Context, interval: str, once: bool, container_id: str) -> None:
    """Print a container's resource usage as JSON events."""
    period = _seconds(interval)
    oom_kills = -1
    while True:
        try:
            raw = query.stats(ctx, container_id)
        except InvalidState:
            if once or oom_kills < 0:
                raise
            return  # the container stopped: the stream ends, as runc's does
        data = stats_from_cgroup(raw)
        kills = oom_kill_count(raw)
        if 0 <= oom_kills < kills:
            click.echo(json.dumps({"type": "oom", "id": container_id}))
        oom_kills = kills
        click.echo(json.dumps({"type": "stats", "id": container_id, "data": data}))
        if once:
            return
        time.sleep(period)


COMMANDS = [events]

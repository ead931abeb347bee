"""`bonneville exec`: run another process in a running container (through a host proxy)."""

from __future__ import annotations

import json

import click

from bonneville.shim.lifecycle import running
from bonneville.shim.lifecycle.context import Context
from bonneville.spec.errors import ConfigError


@click.command(
    "exec",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option("--process", "-p", "process_file", default=None, help="JSON process spec file")
@click.option("--console-socket", default=None, help="unix socket that receives the pty master")
@click.option("--cwd", default=None, help="working directory in the container")
@click.option("--env", "-e", multiple=True, help="extra environment variable")
@click.option("--tty", "-t", is_flag=True, help="allocate a pseudo-TTY")
@click.option("--user", "-u", default=None, help="UID[:GID]")
@click.option("--detach", "-d", is_flag=True, help="detach from the process")
@click.option("--pid-file", default=None, help="file to write the process's (proxy's) PID to")
@click.option("--preserve-fds", type=int, default=0, help="accepted; extra fds are not passed")
@click.option("--process-label", default=None, hidden=True)
@click.option("--apparmor", default=None, hidden=True)
@click.option("--no-new-privs", is_flag=True, hidden=True)
@click.option("--cap", "-c", multiple=True, hidden=True)
@click.option("--ignore-paused", is_flag=True, hidden=True)
@click.argument("container_id")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def exec_command(
    ctx: Context,
    process_file: str | None,
    console_socket: str | None,
    cwd: str | None,
    env: tuple[str, ...],
    tty: bool,
    user: str | None,
    detach: bool,
    pid_file: str | None,
    preserve_fds: int,
    process_label: str | None,
    apparmor: str | None,
    no_new_privs: bool,
    cap: tuple[str, ...],
    ignore_paused: bool,
    container_id: str,
    command: tuple[str, ...],
) -> int:
    """Execute a new process inside the container."""
    if process_file:
        try:
            with open(process_file, "rb") as f:
                process = json.load(f)
        except (OSError, ValueError) as exc:
            raise ConfigError(process_file, str(exc)) from exc
        if not isinstance(process, dict):
            raise ConfigError(process_file, "not a JSON object")
    else:
        bundle = running.bundle_of(ctx, container_id)
        process = running.process_for_exec(bundle, list(command), list(env), cwd, user, tty)
    return running.exec_process(ctx, container_id, process, console_socket, detach, pid_file)


COMMANDS = [exec_command]

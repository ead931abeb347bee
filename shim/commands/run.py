"""`bonneville run`: create + start, then wait for the container and exit with its status."""

from __future__ import annotations

import click

from bonneville.shim.lifecycle import running
from bonneville.shim.lifecycle.context import Context


@click.command("run")
@click.option("--bundle", "-b", default=".", help="path to the OCI bundle")
@click.option("--console-socket", default=None, help="unix socket that receives the pty master")
@click.option("--detach", "-d", is_flag=True, help="do not wait for the container")
@click.option("--pid-file", default=None, help="file to write the container's PID to")
@click.option("--keep", is_flag=True, help="do not delete the container after it exits")
@click.option("--no-subreaper", is_flag=True, help="accepted for runc compatibility")
@click.option("--no-pivot", is_flag=True, help="accepted for runc compatibility")
@click.option("--no-new-keyring", is_flag=True, help="accepted for runc compatibility")
@click.option("--preserve-fds", type=int, default=0, help="accepted; extra fds are not passed")
@click.argument("container_id")
@click.pass_obj
def run(
    ctx: Context,
    bundle: str,
    console_socket: str | None,
    detach: bool,
    pid_file: str | None,
    keep: bool,
    no_subreaper: bool,
    no_pivot: bool,
    no_new_keyring: bool,
    preserve_fds: int,
    container_id: str,
) -> int:
    """Create and start a container; wait for it unless --detach."""
    return running.run(ctx, container_id, bundle, pid_file, console_socket, detach, keep)


COMMANDS = [run]

"""`bonneville create`: the container's VM is up and its agent waiting when this returns."""

from __future__ import annotations

import click

from bonneville.shim.lifecycle import creation
from bonneville.shim.lifecycle.context import Context


@click.command("create")
@click.option("--bundle", "-b", default=".", help="path to the OCI bundle")
@click.option("--console-socket", default=None, help="unix socket that receives the pty master")
@click.option("--pid-file", default=None, help="file to write the container's (monitor's) PID to")
@click.option("--no-pivot", is_flag=True, help="accepted for runc compatibility")
@click.option("--no-new-keyring", is_flag=True, help="accepted for runc compatibility")
@click.option("--preserve-fds", type=int, default=0, help="accepted; extra fds are not passed")
@click.argument("container_id")
@click.pass_obj
def create(
    ctx: Context,
    bundle: str,
    console_socket: str | None,
    pid_file: str | None,
    no_pivot: bool,
    no_new_keyring: bool,
    preserve_fds: int,
    container_id: str,
) -> None:
    """Create a container (boot its VM) without starting its process."""
    creation.create(ctx, container_id, bundle, pid_file, console_socket)


COMMANDS = [create]

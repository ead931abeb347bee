"""The `bonneville` command: runc's global flags and commands (one module per command)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, NoReturn

import click

from bonneville.shim import log as shimlog
from bonneville.shim.lifecycle import Context
from bonneville.shim.state import DEFAULT_ROOT, Store
from bonneville.spec.errors import BonnevilleError

VERSION = "0.1.0"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--root", default=DEFAULT_ROOT, show_default=True, help="state directory")
@click.option("--log", "log_file", default=None, help="log file (json with --log-format json)")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text")
@click.option("--debug", is_flag=True, help="debug logging")
@click.option("--systemd-cgroup", is_flag=True, help="accepted for runc compatibility")
@click.option("--rootless", default="auto", help="accepted for runc compatibility")
@click.option("--criu", default="criu", hidden=True)
@click.option(
    "--backend",
    envvar="BONNEVILLE_BACKEND",
    default=None,
    help="VM backend for new containers (default qemu; a container keeps its own)",
)
@click.option(
    "--libvirt-uri",
    default=None,
    help="libvirt URI for new containers of --backend libvirt (qemu:///system, qemu:///embed)",
)
@click.version_option(VERSION, "-v", "--version", prog_name="bonneville")
@click.pass_context
def cli(
    ctx: click.Context,
    root: str,
    log_file: str | None,
    log_format: str,
    debug: bool,
    systemd_cgroup: bool,
    rootless: str,
    criu: str,
    backend: str | None,
    libvirt_uri: str | None,
) -> None:
    """bonneville: an OCI runtime that runs every container in its own virtual machine."""
    shimlog.setup(log_file, log_format, debug)
    if libvirt_uri:
        # The flag outranks $BONNEVILLE_LIBVIRT_URI; the monitor inherits it from here.
        os.environ["BONNEVILLE_LIBVIRT_URI"] = libvirt_uri
    ctx.obj = Context(store=Store(root), backend=backend)


def _register() -> None:
    from bonneville.shim.commands import (
        create,
        delete,
        events,
        exec,
        features,
        image,
        kill,
        pause,
        ps,
        run,
        spec,
        start,
        state,
        template,
        update,
    )
    from bonneville.shim.commands import (
        list as list_cmd,
    )

    modules = (create, delete, events, exec, features, image, kill, list_cmd, pause, ps, run, spec)
    for module in (*modules, start, state, template, update):
        for command in module.COMMANDS:
            cli.add_command(command)


def main(argv: list[str] | None = None) -> None:
    """Entry point: errors become one line on stderr, a JSON entry in --log, and exit 1."""
    _register()
    args = sys.argv[1:] if argv is None else argv
    try:
        result: Any = cli.main(args=args, prog_name="bonneville", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        _fail("aborted")
    except click.ClickException as exc:
        _fail(exc.format_message())
    except BonnevilleError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted")
    except OSError as exc:
        _fail(f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}")
    sys.exit(result if isinstance(result, int) else 0)


def _fail(message: str) -> NoReturn:
    line = " ".join(message.split())
    logging.getLogger("bonneville").error("%s", line)
    with contextlib.suppress(OSError, ValueError):
        print(f"bonneville: {line}", file=sys.stderr)
    sys.exit(1)

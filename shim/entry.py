"""The `bonneville` command (the launcher install.sh writes, and the package's script, call
:func:`main`): the CLI of shim/cli.py, with a container's monitor forked before the CLI imports
anything when the command will create one (shim/launch.py says why)."""

from __future__ import annotations

import os
import sys

from bonneville.shim import launch

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn


def main() -> NoReturn:
    launch.start(sys.argv[1:])
    try:
        from bonneville.shim.cli import main as cli_main

        cli_main()
        status = 0
    except SystemExit as exc:
        status = exit_status(exc.code)
    finally:
        launch.discard()
    leave(status)


def exit_status(code: object) -> int:
    """The exit status Python gives ``sys.exit(code)``: a text is printed, and means 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def leave(status: int) -> NoReturn:
    """Exit without the interpreter's teardown. Every CLI call is a fresh process (docker makes
    four per `docker run`), and tearing down its modules costs ~6 ms of each: only the standard
    streams and the log file hold anything still to write."""
    if "logging" in sys.modules:
        import logging

        logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            # A reader that went away (or a closed stream): Python would exit 120 for stdout.
            status = status or 120
    os._exit(status)

"""The `bonneville` command (the launcher install.sh writes, and the package's script, call
:func:`main`): the CLI of shim/cli.py, with a container's monitor forked before the CLI imports
anything when the command will create one (shim/launch.py says why)."""

from __future__ import annotations

import sys

from bonneville.shim import launch


def main() -> None:
    launch.start(sys.argv[1:])
    try:
        from bonneville.shim.cli import main as cli_main

        cli_main()
    finally:
        launch.discard()

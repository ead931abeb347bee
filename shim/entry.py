"""The `bonneville` command (the launcher install.sh writes, and the package's script, call
:func:`main`): the CLI of shim/cli.py, with a container's monitor forked before the CLI imports
anything when the command will create one (shim/launch.py says why), and containerd's
`delete --force` of a container that is gone answered before it does (:func:`deleted_already`).
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import NoReturn

# The commands that start a monitor, and the global options that take a value (the next
# argument is that value, not the command). Kept in step with shim/cli.py by a test; a miss
# only costs the head start (`create` forks the monitor when it needs it, see launch.take()).
CREATING_COMMANDS = frozenset({"create", "run"})
VALUE_OPTIONS = frozenset(
    {"--root", "--log", "--log-format", "--rootless", "--criu", "--backend", "--libvirt-uri"}
)
# The one global flag containerd's `delete --force` may come with (deleted_already).
_DELETE_FLAGS = frozenset({"--systemd-cgroup"})


def main() -> NoReturn:
    argv = sys.argv[1:]
    if deleted_already(argv):
        leave(0)
    from bonneville.shim import launch

    command, backend = command_of(argv)
    if command in CREATING_COMMANDS:
        launch.start(backend)
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


def command_of(argv: Sequence[str]) -> tuple[str | None, str | None]:
    """The command named in a `bonneville` argument list, and its --backend flag if given."""
    backend = None
    expects_value = None
    for arg in argv:
        if expects_value is not None:
            if expects_value == "--backend":
                backend = arg
            expects_value = None
        elif arg.startswith("--backend="):
            backend = arg.partition("=")[2]
        elif arg in VALUE_OPTIONS:
            expects_value = arg
        elif not arg.startswith("-"):
            return arg, backend
    return None, backend


def deleted_already(argv: list[str]) -> bool:
    """Whether ``argv`` is `delete --force ID` of a container that does not exist, which
    succeeds (runc's rule) with nothing to do: containerd's shim makes that call after every
    container's delete, and answering it here spares it the CLI's imports (~45 ms of ~55).

    Only the plain shape qualifies (global options from VALUE_OPTIONS in either spelling and
    _DELETE_FLAGS, `delete`, `--force` or `-f`, one valid ID): anything else, and any doubt, is
    the CLI's, whose answer this must equal (tests/test_launch.py compares the two).
    """
    from bonneville.shim import ids
    from bonneville.spec.errors import BonnevilleError

    options: dict[str, str] = {}
    rest = iter(argv)
    for arg in rest:
        name, eq, value = arg.partition("=")
        if name in VALUE_OPTIONS:
            options[name] = value if eq else next(rest, "")
        elif arg in _DELETE_FLAGS:
            continue
        elif arg == "delete":
            break
        else:
            return False
    args = list(rest)
    forced = [a for a in args if a in ("--force", "-f")]
    names = [a for a in args if not a.startswith("-")]
    if len(forced) != 1 or len(names) != 1 or len(args) != 2:
        return False
    if options.get("--log-format", "text") not in ("text", "json"):
        return False
    try:
        ids.validate_id(names[0])
    except BonnevilleError:
        return False
    root = options.get("--root", ids.DEFAULT_ROOT)
    if not root:
        return False
    try:
        os.lstat(os.path.join(root, names[0]))
        return False  # it exists (or something by its name does)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    log_file = options.get("--log")
    if log_file:
        # The CLI would open (so create) it; a log it cannot open is its to report.
        try:
            os.close(
                os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
            )
        except OSError:
            return False
    return True

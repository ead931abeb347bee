"""The `bonneville` command (the launcher install.sh writes, and the package's script, call
:func:`main`): the CLI of shim/cli.py, with a container's monitor forked before the CLI imports
anything when the command will create one (shim/launch.py says why), containerd's
`delete --force` of a container that is gone answered before it does (:func:`deleted_already`),
and the plain `start`, `state` and `delete` callers make run without click (:func:`plain_call`).
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import NoReturn

# The commands that start a monitor, and the global options that take a value (the next
# argument is that value, not the command). Kept in step with shim/cli.py by a test; a miss
# only costs the head start (`create` forks the monitor when it needs it, see launch.take()).
CREATING_COMMANDS = frozenset({"create", "run"})
VALUE_OPTIONS = frozenset(
    {"--root", "--log", "--log-format", "--rootless", "--criu", "--backend", "--libvirt-uri"}
)
# The global flags (taking no value) a plain call may have (plain_call).
_PLAIN_FLAGS = frozenset({"--systemd-cgroup", "--debug"})
LOG_FORMATS = ("text", "json")


def main() -> NoReturn:
    argv = sys.argv[1:]
    plain = plain_call(argv)
    if plain is not None:
        leave(0 if deleted_already(plain) else status_of(lambda: run_plain(plain)))
    from bonneville.shim import launch

    command, backend = command_of(argv)
    if command in CREATING_COMMANDS:
        launch.start(backend)
    try:
        status = status_of(_run_cli)
    finally:
        launch.discard()
    leave(status)


def _run_cli() -> None:
    from bonneville.shim.cli import main as cli_main

    cli_main()


def status_of(action: Callable[[], None]) -> int:
    """The exit status of a program that is ``action``: 0, or what its sys.exit() means."""
    try:
        action()
    except SystemExit as exc:
        return exit_status(exc.code)
    return 0


class PlainCall:
    """A `start ID`, `state ID` or `delete [--force] ID` with its global options."""

    def __init__(
        self, options: dict[str, str], debug: bool, command: str, container_id: str, force: bool
    ) -> None:
        self.options = options
        self.debug = debug
        self.command = command
        self.container_id = container_id
        self.force = force


def plain_call(argv: Sequence[str]) -> PlainCall | None:
    """``argv`` as a :class:`PlainCall` if it has the plain shape callers use: global options
    from VALUE_OPTIONS (either spelling, a value not starting with "-") and _PLAIN_FLAGS, then
    `start ID`, `state ID` or `delete ID` with `--force`/`-f` anywhere after `delete`.

    These run without click (run_plain): its import and parsing are ~20 ms of each such CLI
    call, and docker makes a `start` and a `delete` per `docker run`. Anything else (`--help`,
    an unknown flag, a missing value, a bad --log-format) is the CLI's, whose answer for any
    argument list run_plain takes must equal run_plain's (tests/test_launch.py compares them).
    """
    options: dict[str, str] = {}
    debug = False
    rest = iter(argv)
    command = None
    for arg in rest:
        name, eq, value = arg.partition("=")
        if name in VALUE_OPTIONS:
            value = value if eq else next(rest, "-")
            if value.startswith("-"):
                return None
            options[name] = value
        elif arg in _PLAIN_FLAGS:
            debug = debug or arg == "--debug"
        elif arg in ("start", "state", "delete"):
            command = arg
            break
        else:
            return None
    if command is None:
        return None
    args = list(rest)
    force = command == "delete" and any(a in ("--force", "-f") for a in args)
    names = [a for a in args if not (force and a in ("--force", "-f"))]
    if len(names) != 1 or names[0].startswith("-"):
        return None
    if options.get("--log-format", "text") not in LOG_FORMATS or not options.get("--root", "/"):
        return None
    return PlainCall(options, debug, command, names[0], force)


def run_plain(call: PlainCall) -> None:
    """What shim/cli.py does for a plain call: its global options, then the command."""
    import json

    from bonneville.shim import ids
    from bonneville.shim import log as shimlog
    from bonneville.shim.lifecycle import query, running, teardown
    from bonneville.shim.lifecycle.context import Context
    from bonneville.shim.state import Store

    options = call.options
    shimlog.setup(options.get("--log"), options.get("--log-format", "text"), call.debug)
    if options.get("--libvirt-uri"):
        os.environ["BONNEVILLE_LIBVIRT_URI"] = options["--libvirt-uri"]
    backend = options.get("--backend", os.environ.get("BONNEVILLE_BACKEND") or None)
    ctx = Context(store=Store(options.get("--root", ids.DEFAULT_ROOT)), backend=backend)
    try:
        if call.command == "start":
            running.start(ctx, call.container_id)
        elif call.command == "delete":
            teardown.delete(ctx, call.container_id, call.force)
        else:
            state = query.container_state(ctx, call.container_id)
            print(json.dumps(state, indent=2))
    except (Exception, KeyboardInterrupt) as exc:
        text = shimlog.error_text(exc)
        if text is None:
            raise
        shimlog.fail(text)


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


def deleted_already(call: PlainCall) -> bool:
    """Whether ``call`` is `delete --force ID` of a container that does not exist, which
    succeeds (runc's rule) with nothing to do: containerd's shim makes that call after every
    container's delete, and answering it here spares it even run_plain's imports.

    Without --debug only, and with a valid ID: anything else, and any doubt, is run_plain's,
    whose answer this must equal (tests/test_launch.py compares both with the CLI's).
    """
    from bonneville.shim import ids
    from bonneville.spec.errors import BonnevilleError

    if call.command != "delete" or not call.force or call.debug:
        return False
    try:
        ids.validate_id(call.container_id)
    except BonnevilleError:
        return False
    options = call.options
    root = options.get("--root", ids.DEFAULT_ROOT)
    if not root:
        return False
    try:
        os.lstat(os.path.join(root, call.container_id))
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

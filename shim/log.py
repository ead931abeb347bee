"""Logging as runc does it: --log FILE, --log-format text|json; errors as one JSON line that
containerd's shim reads back (fields level, msg, time)."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from datetime import UTC, datetime

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "level": record.levelname.lower(),
                "msg": record.getMessage(),
                "time": datetime.fromtimestamp(record.created, UTC)
                .isoformat(timespec="seconds")
                .replace("+00:00", "Z"),
            }
        )


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="seconds")
        return f'time="{stamp}" level={record.levelname.lower()} msg="{record.getMessage()}"'


def setup(log_file: str | None, log_format: str, debug: bool) -> logging.Logger:
    """Configure the "bonneville" logger; without --log, warnings and errors go to nowhere
    but stderr's one error line (printed by the CLI itself)."""
    logger = logging.getLogger("bonneville")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    if log_file:
        try:
            handler: logging.Handler = logging.FileHandler(log_file, encoding="utf-8")
        except OSError as exc:
            print(f"bonneville: cannot open log file {log_file}: {exc.strerror}", file=sys.stderr)
            handler = logging.NullHandler()
    else:
        handler = logging.NullHandler()
    handler.setFormatter(JSONFormatter() if log_format == "json" else TextFormatter())
    logger.addHandler(handler)
    return logger


def error_text(exc: BaseException) -> str | None:
    """The message of an error the CLI reports as one line (ours, an interrupt, an OSError);
    None for anything else, which is a bug to show in full."""
    from bonneville.spec.errors import BonnevilleError

    if isinstance(exc, BonnevilleError):
        return str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, OSError):
        return f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}"
    return None


def fail(message: str) -> NoReturn:
    """The CLI's end on an error: one line on stderr, an entry in --log, exit status 1."""
    line = " ".join(message.split())
    logger = logging.getLogger("bonneville")
    if logger.handlers:  # else click failed before the global options set it up: stderr only
        logger.error("%s", line)
    with contextlib.suppress(OSError, ValueError):
        print(f"bonneville: {line}", file=sys.stderr)
    sys.exit(1)

"""Signal names and numbers as runc accepts them: 9, KILL, SIGKILL (any case)."""

from __future__ import annotations

import signal

from bonneville.spec.errors import BonnevilleError

# Signals whose default action is to do nothing: sending them to a container that has not
# started must not stop it (runc's init would ignore them too).
IGNORED_BY_DEFAULT = frozenset({signal.SIGCHLD, signal.SIGCONT, signal.SIGURG, signal.SIGWINCH})


def parse_signal(text: str) -> int:
    """The signal number for ``text``; one clear error if it names no signal."""
    value = text.strip()
    if value.isdigit():
        number = int(value)
        if 0 <= number < signal.NSIG:  # 0: runc's existence check
            return number
        raise BonnevilleError(f"invalid signal: {text}")
    name = value.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        if name.startswith("SIGRTMIN+") or name.startswith("SIGRTMAX-"):
            base, _, offset = name[3:].partition("+" if "+" in name else "-")
            if offset.isdigit():
                n = (
                    signal.SIGRTMIN + int(offset)
                    if base == "RTMIN"
                    else signal.SIGRTMAX - int(offset)
                )
                if signal.SIGRTMIN <= n <= signal.SIGRTMAX:
                    return int(n)
        raise BonnevilleError(f"invalid signal: {text}") from None


def exit_status_for_signal(signum: int) -> int:
    return 128 + signum

"""A container process's last steps before execve, in runc's order, and the agent's view of a
running one (its streams). The namespaces and the root are made and joined in spawn.py; this
is what every process does inside them: stdio, rlimits, capabilities, user, working directory,
the program.
Standard library only: this module goes into the guest image."""

from __future__ import annotations

import array
import errno
import fcntl
import os
import resource
import signal
import socket
import stat
import struct
import termios

from bonneville.guest import linux, protocol, syscallfilter
from bonneville.guest.common import ExecError, Refused, errtext, write_file

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MAX_FD = 1 << 20  # closerange's end in a new child (close_range(2) makes it cheap)
TIOCSPTLCK = 0x40045431
TIOCGPTPEER = 0x5441
CAP_NUMBERS = {name: number for number, name in enumerate(protocol.CAPABILITIES)}

# execve(2)'s limits on argv and envp (fs/exec.c): each string, with its NUL, at most
# MAX_ARG_STRLEN; all strings and their pointers at most a quarter of RLIMIT_STACK, but never
# more than 3/4 of _STK_LIM (spec/config.py refuses more at create) nor less than MAX_ARG_STRLEN.
MAX_ARG_STRLEN = 32 * 4096
EXEC_ARGS_CEILING = 6 << 20
POINTER_SIZE = 8

# What a child tells the agent over its report socket (SOCK_SEQPACKET: one message each;
# close-on-exec, so a successful execve ends it with end of file, and so does an exit).
BUILT = b"B"  # the container's namespaces and root are made (with the pty master, if any)
FAILED = b"E"  # + why the container could not be built
EXEC_FAILED = b"X"  # + why the program could not be started (runc's wording)


class ExecSpec:
    """An OCI ``process`` object, checked in the agent before the fork."""

    def __init__(self, process: dict[str, Any], want_stdin: bool, cap_last: int) -> None:
        args = process.get("args")
        if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
            raise Refused("process.args must be a non-empty list of strings")
        self.args: list[str] = args
        self.env: dict[str, str] = {}
        for entry in process.get("env") or []:
            key, sep, value = str(entry).partition("=")
            if sep and key:
                self.env[key] = value
        self.cwd = str(process.get("cwd") or "/")
        self.terminal = bool(process.get("terminal"))
        self.want_stdin = want_stdin
        size = process.get("consoleSize") or {}
        self.rows = int(size.get("height") or 0)
        self.cols = int(size.get("width") or 0)
        user = process.get("user") or {}
        self.uid = int(user.get("uid") or 0)
        self.gid = int(user.get("gid") or 0)
        self.groups = [int(g) for g in user.get("additionalGids") or []]
        umask = user.get("umask")
        self.umask = 0o022 if umask is None else int(umask)
        self.rlimits: list[tuple[int, int, int, str]] = []
        for rlimit in process.get("rlimits") or []:
            name = str(rlimit.get("type"))
            number = getattr(resource, name, None)
            if not name.startswith("RLIMIT_") or not isinstance(number, int):
                raise Refused(f"unknown rlimit type {name!r}")
            self.rlimits.append(
                (number, self._limit(rlimit.get("soft")), self._limit(rlimit.get("hard")), name)
            )
        oom = process.get("oomScoreAdj")
        self.oom_score_adj = None if oom is None else int(oom)
        self.no_new_privileges = bool(process.get("noNewPrivileges"))
        caps = process.get("capabilities")
        # runc: no capabilities object means the process keeps what it has (all, as root).
        self.caps: dict[str, int] | None = None
        if caps is not None:
            self.caps = {
                kind: self._capmask(caps.get(kind), cap_last)
                for kind in ("bounding", "effective", "permitted", "inheritable", "ambient")
            }
        self.cap_last = cap_last
        # The container's seccomp profile (linux.seccomp), set by rpc.py's create and exec.
        self.seccomp: dict[str, Any] | None = None

    @staticmethod
    def _limit(value: Any) -> int:
        number = int(value or 0)
        return resource.RLIM_INFINITY if number >= 1 << 63 else number

    @staticmethod
    def _capmask(names: Any, cap_last: int) -> int:
        mask = 0
        for name in names or []:
            number = CAP_NUMBERS.get(str(name).upper())
            # runc warns about and skips capabilities this kernel does not know.
            if number is not None and number <= cap_last:
                mask |= 1 << number
        return mask


class Proc:
    """A process the host started: its streams and the stdin bytes it has not read yet."""

    def __init__(self, ident: int, pid: int, terminal: bool, container: str) -> None:
        self.id = ident
        self.pid = pid
        self.container = container
        self.terminal = terminal
        self.outputs: dict[int, int] = {}  # readable fd → STDOUT/STDERR
        self.stdin_fd: int | None = None  # a pipe, or the pty master (also in outputs)
        self.pending = bytearray()
        self.stdin_eof = False
        self.init = False  # the container's init: its end is the container's

    def close_stdin(self) -> None:
        """Stop writing stdin; close the pipe (the pty master stays for output)."""
        fd, self.stdin_fd = self.stdin_fd, None
        self.pending.clear()
        if fd is not None and fd not in self.outputs:
            os.close(fd)


def set_winsize(fd: int, rows: int, cols: int) -> None:
    """TIOCSWINSZ."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def find_executable(path: str) -> str | None:
    """Go's exec.findExecutable: None if runnable, else the error text."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"stat {path}: {errtext(exc)}"
    if stat.S_ISDIR(st.st_mode):
        return "is a directory"
    if st.st_mode & 0o111:
        return None
    return "permission denied"


def look_path(name: str, env: dict[str, str]) -> str:
    """Go's exec.LookPath with the container's PATH, with runc's error wording."""
    if "/" in name:
        problem = find_executable(name)
        if problem is not None:
            raise ExecError(f'exec: "{name}": {problem}')
        return name
    for directory in env.get("PATH", "").split(":"):
        candidate = os.path.join(directory or ".", name)
        if find_executable(candidate) is None:
            return candidate
    raise ExecError(f'exec: "{name}": executable file not found in $PATH')


def home_of(uid: int) -> str:
    """The uid's home in the container's /etc/passwd, "/" if none (runc's HOME default)."""
    try:
        with open("/etc/passwd") as f:
            for line in f:
                fields = line.rstrip("\n").split(":")
                if len(fields) >= 6 and fields[2] == str(uid):
                    return fields[5] or "/"
    except OSError:
        pass
    return "/"


def open_pty(ptmx: str) -> tuple[int, int]:
    """A pty from the devpts instance whose ptmx is ``ptmx`` (the container's, so ``tty``
    names it inside the container); the agent's own devpts when the container has none."""
    try:
        master = os.open(ptmx, os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return os.openpty()
    try:
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
        # TIOCGPTPEER opens the slave without a path lookup, which the namespaces would confuse.
        slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        os.close(master)
        raise
    return master, slave


def report_pair() -> tuple[socket.socket, socket.socket]:
    """(the agent's end, the child's end) of a child's report socket."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return ours, theirs


def send_report(sock_fd: int, kind: bytes, text: str = "", fd: int | None = None) -> None:
    """In the child: one report message, with a descriptor if given."""
    sock = socket.socket(fileno=sock_fd)
    try:
        payload = kind + text.encode(errors="replace")[: 1 << 15]
        if fd is None:
            sock.send(payload)
        else:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
            sock.sendmsg([payload], ancillary)
    finally:
        sock.detach()


def read_report(sock: socket.socket) -> tuple[bytes, str, int | None]:
    """In the agent: the child's next report (blocking): (kind, text, descriptor). End of file
    (the program runs, or the child is gone without a word) is (b"", "", None)."""
    fds = array.array("i")
    message, ancillary, _, _ = sock.recvmsg(1 << 16, socket.CMSG_SPACE(fds.itemsize))
    fd = None
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            fd = fds[0] if fds else None
    if not message:
        return b"", "", fd
    return message[:1], message[1:].decode(errors="replace"), fd


def reset_signals() -> None:
    """A child starts with default signal handling and an empty mask (Python ignores SIGPIPE
    and SIGXFSZ, and the agent has handlers and a wake-up fd)."""
    signal.set_wakeup_fd(-1)
    for sig in range(1, signal.NSIG):
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass  # real-time signals Python does not name
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def attach_stdio(stdio: tuple[int, int, int], slave: int | None, uid: int, keep: set[int]) -> None:
    """A new session with the pty (if any) as its controlling terminal, ``stdio`` as 0-2, and
    every other descriptor but ``keep`` closed: nothing of the agent's (the port, other
    processes' pipes, namespace handles) may leak into the container."""
    os.setsid()
    if slave is not None:
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        try:
            os.fchown(slave, uid, -1)  # as login does: the tty belongs to its user
        except OSError:
            pass
    for target, fd in enumerate(stdio):
        os.dup2(fd, target)
    low = 3
    for kept in sorted(keep):
        if kept >= low:
            os.closerange(low, kept)
            low = kept + 1
    os.closerange(low, MAX_FD)


def become(spec: ExecSpec, go: int | None = None) -> None:
    """In a child inside the container (namespaces, cgroup, root, stdio): the rest of runc's
    order, then execve; raises ExecError on failure. With ``go`` (a prepared init process),
    everything up to execve is done, then a byte read from ``go`` starts the program (end of
    file: nobody will start it; exit)."""
    if spec.oom_score_adj is not None:
        write_file("/proc/self/oom_score_adj", str(spec.oom_score_adj))
    flt = syscallfilter.build(spec.seccomp) if spec.seccomp else None
    if flt is not None and not spec.no_new_privileges:
        # As runc: without no_new_privs only CAP_SYS_ADMIN may load it, so before the
        # capabilities and the user change (which the profile must then allow).
        syscallfilter.load(flt)
    chdir_later = False
    try:
        os.chdir(spec.cwd)
    except PermissionError:
        chdir_later = True  # maybe the container user may enter it: retry after setuid
    except OSError as exc:
        raise ExecError(
            f'chdir to cwd ("{spec.cwd}") set in config.json failed: {errtext(exc)}'
        ) from exc
    for number, soft, hard, name in spec.rlimits:
        try:
            resource.setrlimit(number, (soft, hard))
        except (OSError, ValueError) as exc:
            text = errtext(exc) if isinstance(exc, OSError) else str(exc)
            raise ExecError(f"error setting rlimit type {name}: {text}") from exc
    caps = spec.caps
    if caps is not None:
        for number in range(spec.cap_last + 1):
            if not caps["bounding"] >> number & 1:
                linux.prctl(linux.PR_CAPBSET_DROP, number)
        linux.prctl(linux.PR_SET_KEEPCAPS, 1)
    env = dict(spec.env)
    if "HOME" not in env:
        env["HOME"] = home_of(spec.uid)
    os.setgroups(spec.groups)
    os.setgid(spec.gid)
    os.setuid(spec.uid)
    if chdir_later:
        try:
            os.chdir(spec.cwd)
        except OSError as exc:
            raise ExecError(
                f'chdir to cwd ("{spec.cwd}") set in config.json failed: {errtext(exc)}'
            ) from exc
    if caps is not None:
        linux.prctl(linux.PR_SET_KEEPCAPS, 0)
        linux.capset(caps["effective"], caps["permitted"], caps["inheritable"])
        for number in range(spec.cap_last + 1):
            if caps["ambient"] >> number & 1:
                try:
                    linux.prctl(linux.PR_CAP_AMBIENT, linux.PR_CAP_AMBIENT_RAISE, number)
                except OSError:
                    pass  # runc only warns: ambient needs the cap in permitted and inheritable
    os.umask(spec.umask)
    path = look_path(spec.args[0], env)
    if spec.no_new_privileges:
        linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
        if flt is not None:
            syscallfilter.load(flt)  # as late as can be: only the wait and execve remain
    if go is not None and not os.read(go, 1):
        os._exit(0)
    try:
        os.execve(path, spec.args, env)
    except OSError as exc:
        if exc.errno == errno.E2BIG:
            why = too_long(spec.args, env)
            raise ExecError(f"exec {path}: {errtext(exc)} ({why})") from exc
        raise ExecError(f"exec {path}: {errtext(exc)}") from exc


def too_long(args: list[str], env: dict[str, str]) -> str:
    """Why execve(2) found the argument list too long, in config.json's terms: the string, or
    the field, over the kernel's limit."""
    for i, arg in enumerate(args):
        size = len(os.fsencode(arg)) + 1
        if size > MAX_ARG_STRLEN:
            return (
                f"process.args[{i}] is {size_text(size)}; the kernel accepts at most"
                f" {size_text(MAX_ARG_STRLEN)} per string"
            )
    strings = [f"{key}={value}" for key, value in env.items()]
    for string in strings:
        size = len(os.fsencode(string)) + 1
        if size > MAX_ARG_STRLEN:
            name = string.partition("=")[0]
            return (
                f"process.env entry {name} is {size_text(size)}; the kernel accepts at most"
                f" {size_text(MAX_ARG_STRLEN)} per string"
            )
    sizes = {
        "process.args": sum(len(os.fsencode(a)) + 1 + POINTER_SIZE for a in args),
        "process.env": sum(len(os.fsencode(e)) + 1 + POINTER_SIZE for e in strings),
    }
    big, small = sorted(sizes, key=lambda field: sizes[field], reverse=True)
    stack = resource.getrlimit(resource.RLIMIT_STACK)[0]
    finite = stack != resource.RLIM_INFINITY
    if finite and MAX_ARG_STRLEN <= stack // 4 <= EXEC_ARGS_CEILING:
        limit, reason = stack // 4, f"a quarter of RLIMIT_STACK, {size_text(stack)}"
    elif finite and stack // 4 < MAX_ARG_STRLEN:
        limit, reason = MAX_ARG_STRLEN, "the least it allows, whatever RLIMIT_STACK says"
    else:
        limit, reason = EXEC_ARGS_CEILING, "the most it allows, whatever RLIMIT_STACK says"
    return (
        f"{big} is {size_text(sizes[big])}, {small} {size_text(sizes[small])}; the kernel"
        f" accepts at most {size_text(limit)} for both, {reason}"
    )


def size_text(size: int) -> str:
    """A size as people read it: 12 bytes, 195.3 KiB, 2.9 MiB."""
    if size >= 1 << 20:
        return f"{size / (1 << 20):.1f} MiB"
    if size >= 1 << 10:
        return f"{size / (1 << 10):.1f} KiB"
    return f"{size} bytes"

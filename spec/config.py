"""config.json: loading, validation (JSON Schema + the runtime-spec's MUSTs) and typed access.

The CLI runs several times per container start, so this module imports nothing heavy at import
time: jsonschema is imported, and its validators compiled, only when a document is validated.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from bonneville.spec.errors import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from jsonschema.exceptions import ValidationError
    from jsonschema.protocols import Validator

__all__ = [
    "CAPABILITY_SETS",
    "HOOK_KINDS",
    "RLIMIT_TYPES",
    "Bundle",
    "Hook",
    "Hooks",
    "Linux",
    "Mount",
    "Namespace",
    "Process",
    "Resources",
    "Rlimit",
    "Root",
    "Spec",
    "User",
    "load_bundle",
    "load_process",
    "parse_process",
    "parse_spec",
    "validate_config",
]

CONFIG_NAME = "config.json"
SCHEMA_PATH = os.path.join(os.path.dirname(__file__), "schema.json")

# The Linux CFS default; used when a quota comes without a period (as the kernel does).
DEFAULT_CPU_PERIOD_US = 100_000

CAPABILITY_SETS = ("bounding", "effective", "inheritable", "permitted", "ambient")

# (config.json key, Hooks field) in the order the lifecycle runs them.
HOOK_KINDS = (
    ("prestart", "prestart"),
    ("createRuntime", "create_runtime"),
    ("createContainer", "create_container"),
    ("startContainer", "start_container"),
    ("poststart", "poststart"),
    ("poststop", "poststop"),
)

# getrlimit(2) on Linux: the spec says a type that maps to no kernel resource MUST be an error.
RLIMIT_TYPES = frozenset(
    {
        "RLIMIT_AS",
        "RLIMIT_CORE",
        "RLIMIT_CPU",
        "RLIMIT_DATA",
        "RLIMIT_FSIZE",
        "RLIMIT_LOCKS",
        "RLIMIT_MEMLOCK",
        "RLIMIT_MSGQUEUE",
        "RLIMIT_NICE",
        "RLIMIT_NOFILE",
        "RLIMIT_NPROC",
        "RLIMIT_RSS",
        "RLIMIT_RTPRIO",
        "RLIMIT_RTTIME",
        "RLIMIT_SIGPENDING",
        "RLIMIT_STACK",
    }
)

# execve(2) takes argv and envp (their strings, a NUL each, and a pointer to each) up to a
# quarter of the process's RLIMIT_STACK, but never more than 3/4 of the kernel's _STK_LIM of
# 8 MiB (fs/exec.c, bprm_stack_limits): a process beyond that can never start, whatever its
# limits, and is refused here (the agent protocol could not carry much more). Within it, as
# under runc, whether the process's own limits allow it is execve's to say, at start.
EXEC_ARGS_CEILING = 6 << 20
EXEC_POINTER_SIZE = 8

# SemVer 2.0.0 (config.md: ociVersion MUST be SemVer); only the major number matters to us.
_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?$"
)


# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class Root:
    path: str
    readonly: bool = False


@dataclass(frozen=True)
class User:
    uid: int = 0
    gid: int = 0
    umask: int | None = None
    additional_gids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Rlimit:
    type: str
    hard: int
    soft: int


@dataclass(frozen=True)
class Process:
    terminal: bool = False
    # (height, width); None unless terminal is true (the spec says to ignore it otherwise).
    console_size: tuple[int, int] | None = None
    user: User = field(default_factory=User)
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    cwd: str = "/"
    # Always holds the five sets; a set absent from config.json is empty (no capabilities).
    capabilities: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {name: () for name in CAPABILITY_SETS}
    )
    rlimits: tuple[Rlimit, ...] = ()
    no_new_privileges: bool = False
    oom_score_adj: int | None = None


@dataclass(frozen=True)
class Mount:
    destination: str
    type: str = ""
    source: str = ""
    options: tuple[str, ...] = ()

    @property
    def is_bind(self) -> bool:
        """True for bind mounts: type "bind", or a "bind"/"rbind" option (runc's rule)."""
        return self.type == "bind" or "bind" in self.options or "rbind" in self.options


@dataclass(frozen=True)
class Hook:
    path: str
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    timeout: int | None = None


@dataclass(frozen=True)
class Hooks:
    prestart: tuple[Hook, ...] = ()
    create_runtime: tuple[Hook, ...] = ()
    create_container: tuple[Hook, ...] = ()
    start_container: tuple[Hook, ...] = ()
    poststart: tuple[Hook, ...] = ()
    poststop: tuple[Hook, ...] = ()


@dataclass(frozen=True)
class Namespace:
    type: str
    path: str = ""


@dataclass(frozen=True)
class Resources:
    memory_limit: int | None = None
    cpu_quota: int | None = None
    cpu_period: int | None = None
    cpu_shares: int | None = None
    cpus: str | None = None

    def vcpus(self, host_cpus: int) -> int:
        """vCPUs for the VM: ceil(quota/period), at least 1, at most ``host_cpus``; 1 if unset."""
        wanted = 1
        if self.cpu_quota is not None and self.cpu_quota > 0:
            period = self.cpu_period or DEFAULT_CPU_PERIOD_US
            wanted = math.ceil(self.cpu_quota / period)
        return max(1, min(wanted, host_cpus))

    def memory_mib(self, default: int = 256, floor: int = 128) -> int:
        """Guest RAM in MiB: the limit rounded up, at least ``floor``; ``default`` if unlimited."""
        # -1 is "unlimited" (cgroup v1 convention, and what docker writes for --memory=-1).
        if self.memory_limit is None or self.memory_limit <= 0:
            return default
        return max(floor, -(-self.memory_limit // (1024 * 1024)))


@dataclass(frozen=True)
class Linux:
    namespaces: tuple[Namespace, ...] = ()
    resources: Resources = field(default_factory=Resources)
    masked_paths: tuple[str, ...] = ()
    readonly_paths: tuple[str, ...] = ()
    sysctl: dict[str, str] = field(default_factory=dict)
    devices: tuple[dict[str, Any], ...] = ()
    uid_mappings: tuple[dict[str, Any], ...] = ()
    gid_mappings: tuple[dict[str, Any], ...] = ()
    cgroups_path: str = ""
    # Applied in the guest by the agent (guest/syscallfilter.py).
    seccomp: dict[str, Any] | None = None

    def namespace(self, ns_type: str) -> Namespace | None:
        """The entry of that type, or None when the container shares the runtime's."""
        for ns in self.namespaces:
            if ns.type == ns_type:
                return ns
        return None


@dataclass(frozen=True)
class Spec:
    oci_version: str
    root: Root
    process: Process | None = None
    hostname: str = ""
    domainname: str = ""
    mounts: tuple[Mount, ...] = ()
    hooks: Hooks = field(default_factory=Hooks)
    annotations: dict[str, str] = field(default_factory=dict)
    linux: Linux = field(default_factory=Linux)


@dataclass(frozen=True)
class Bundle:
    path: str  # absolute bundle directory
    raw: dict[str, Any]  # config.json as parsed, for anything the dataclasses do not carry
    spec: Spec
    rootfs: str  # absolute; root.path resolved against the bundle directory

    @property
    def config_path(self) -> str:
        """The absolute path of this bundle's config.json."""
        return os.path.join(self.path, CONFIG_NAME)


# --------------------------------------------------------------------------- loading


def load_bundle(bundle: str, *, validate: bool = True) -> Bundle:
    """Read, validate and parse ``<bundle>/config.json``; ConfigError says what is wrong.

    ``validate=False`` skips the schema (and the jsonschema import) for a config already
    validated by ``create``; a config edited since then may then fail with a vaguer reason.
    """
    path, config_path = _bundle_paths(bundle)
    raw = _read_json_object(config_path)
    if validate:
        validate_config(raw, config_path)
    return _parse_bundle(path, raw, config_path)


def open_bundle(bundle: str) -> tuple[Bundle, PendingValidation]:
    """``load_bundle`` for ``create``: the bundle parsed now, its validation still running in a
    child (:class:`PendingValidation`). An error raised here is the validation's if it has one,
    so the verdicts are ``load_bundle``'s."""
    path, config_path = _bundle_paths(bundle)
    raw = _read_json_object(config_path)
    pending = PendingValidation(raw, config_path)
    try:
        return _parse_bundle(path, raw, config_path), pending
    except ConfigError:
        pending.result()  # the schema's reason, if it has one, outranks the parser's
        raise
    except BaseException:
        pending.abandon()
        raise


def _bundle_paths(bundle: str) -> tuple[str, str]:
    path = os.path.abspath(bundle)
    if not os.path.exists(path):
        raise ConfigError(path, "bundle directory not found")
    if not os.path.isdir(path):
        raise ConfigError(path, "bundle is not a directory")
    return path, os.path.join(path, CONFIG_NAME)


def parse_bundle(path: str, raw: dict[str, Any]) -> Bundle:
    """The Bundle at ``path`` (absolute) whose config.json reads ``raw`` (the monitor's copy of
    the one `create` opened)."""
    return _parse_bundle(path, raw, os.path.join(path, CONFIG_NAME))


def _parse_bundle(path: str, raw: dict[str, Any], config_path: str) -> Bundle:
    try:
        spec = parse_spec(raw)
        rootfs = os.path.normpath(os.path.join(path, spec.root.path))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(config_path, f"invalid config ({type(exc).__name__}: {exc})") from exc
    if not os.path.exists(rootfs):
        raise ConfigError(config_path, f"rootfs {rootfs} not found (root.path {spec.root.path!r})")
    if not os.path.isdir(rootfs):
        raise ConfigError(config_path, f"rootfs {rootfs} is not a directory")
    return Bundle(path=path, raw=raw, spec=spec, rootfs=rootfs)


def load_process(path: str) -> tuple[dict[str, Any], Process]:
    """Read an OCI ``process`` object (``exec --process FILE``): the raw dict and its Process."""
    where = os.path.abspath(path)
    raw = _read_json_object(where)
    return raw, parse_process(raw, where)


def validate_config(raw: Mapping[str, Any], where: str) -> None:
    """Check a parsed config.json: supported ociVersion, the schema, then the spec's MUSTs."""
    version = raw.get("ociVersion")
    if isinstance(version, str):
        _check_oci_version(version, where)
    _schema_check("config", raw, where, prefix="")
    _semantic_check(raw, where)


class PendingValidation:
    """``validate_config`` running in a forked child while the caller goes on.

    ``create`` launches the VM meanwhile and asks for the verdict (``result``) before it runs a
    hook: importing jsonschema alone takes ~0.1 s on a TCG host, and validating in a child also
    keeps jsonschema (*measured* ~5 MiB) out of ``create``'s other fork, the monitor, which lives
    as long as the container. The child's answer is the ConfigError's reason, if any.
    """

    def __init__(self, raw: Mapping[str, Any], where: str) -> None:
        self.raw, self.where = raw, where
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe and exits
            status = 0
            try:
                os.close(read_end)
                try:
                    validate_config(raw, where)
                except ConfigError as exc:
                    os.write(write_end, exc.reason.encode(errors="replace"))
                    status = 1
            except BaseException:
                status = 2
            finally:
                os._exit(status)
        os.close(write_end)
        self.pid, self.fd = pid, read_end

    def result(self) -> None:
        """Wait for the verdict; ConfigError if the config is invalid. Once only: later calls
        (and ``abandon``) do nothing."""
        if not self.pid:
            return
        chunks = []
        try:
            while chunk := os.read(self.fd, 65536):
                chunks.append(chunk)
        finally:
            os.close(self.fd)
            _, wait_status = os.waitpid(self.pid, 0)
            self.pid = 0
        code = os.waitstatus_to_exitcode(wait_status)
        if code == 1:
            raise ConfigError(self.where, b"".join(chunks).decode(errors="replace"))
        if code != 0:
            validate_config(self.raw, self.where)  # the child died some other way: here, then

    def abandon(self) -> None:
        """No verdict wanted any more (create failed first): end the child, leave nothing."""
        if not self.pid:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        os.close(self.fd)
        os.waitpid(self.pid, 0)
        self.pid = 0


def parse_spec(raw: Mapping[str, Any]) -> Spec:
    """Build a Spec from a config dict already checked by validate_config."""
    process_raw = raw.get("process")
    linux_raw: Mapping[str, Any] = raw.get("linux") or {}
    root_raw: Mapping[str, Any] = raw["root"]
    hooks_raw: Mapping[str, Any] = raw.get("hooks") or {}
    return Spec(
        oci_version=raw["ociVersion"],
        root=Root(path=root_raw["path"], readonly=bool(root_raw.get("readonly", False))),
        process=_build_process(process_raw) if process_raw is not None else None,
        hostname=raw.get("hostname", ""),
        domainname=raw.get("domainname", ""),
        mounts=tuple(
            Mount(
                destination=m["destination"],
                type=m.get("type", ""),
                source=m.get("source", ""),
                options=tuple(m.get("options") or ()),
            )
            for m in raw.get("mounts") or ()
        ),
        hooks=Hooks(
            **{
                attr: tuple(_build_hook(h) for h in hooks_raw.get(key) or ())
                for key, attr in HOOK_KINDS
            }
        ),
        annotations=dict(raw.get("annotations") or {}),
        linux=_build_linux(linux_raw),
    )


def parse_process(raw: Mapping[str, Any], where: str) -> Process:
    """Validate an OCI ``process`` object (schema and MUSTs), then build it.

    ``where`` is the file named in errors; messages say ``process.<field>``.
    """
    _schema_check("process", raw, where, prefix="process")
    _check_process(raw, where, "process")
    return _build_process(raw)


# --------------------------------------------------------------------------- reading


def _read_json_object(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(path, "no such file or directory") from None
    except IsADirectoryError:
        raise ConfigError(path, "is a directory, not a JSON file") from None
    except OSError as exc:
        raise ConfigError(path, f"cannot read: {exc.strerror}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, f"not UTF-8 text (byte {exc.start})") from exc
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            path, f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc
    if not isinstance(doc, dict):
        raise ConfigError(path, f"must hold a JSON object, not {_json_type(doc)}")
    return doc


def _json_type(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "null"


# --------------------------------------------------------------------------- validation


def _check_oci_version(version: str, where: str) -> None:
    match = _SEMVER.match(version)
    if match is None:
        raise ConfigError(where, f"ociVersion {version!r} is not a SemVer version")
    if match.group(1) != "1":
        raise ConfigError(where, f'unsupported ociVersion "{version}": bonneville supports 1.x')


# Compiled validators, one per (sub)schema, built on first use in this process.
_VALIDATORS: dict[str, Validator] = {}


def _validator(name: str) -> Validator:
    cached = _VALIDATORS.get(name)
    if cached is not None:
        return cached
    # Imported here, not at module level: `state`/`kill` must not pay for jsonschema.
    from jsonschema import Draft202012Validator

    with open(SCHEMA_PATH, encoding="utf-8") as f:
        schema: dict[str, Any] = json.load(f)
    if name == "process":
        schema = {
            "$schema": schema["$schema"],
            "$defs": schema["$defs"],
            "$ref": "#/$defs/Process",
        }
    validator: Validator = Draft202012Validator(schema)
    _VALIDATORS[name] = validator
    return validator


def _schema_check(name: str, doc: Mapping[str, Any], where: str, prefix: str) -> None:
    from jsonschema.exceptions import best_match

    error = best_match(_validator(name).iter_errors(doc))
    if error is not None:
        raise ConfigError(where, _describe(error, prefix))


def _describe(error: ValidationError, prefix: str) -> str:
    """One line: the property path (``mounts[2].destination``) and what is wrong there."""
    location = _format_path(error.absolute_path, prefix)
    message = error.message
    if error.validator == "required":
        # jsonschema says "'cwd' is a required property"; name the full path instead.
        missing = re.match(r"^'(.*)' is a required property$", message)
        if missing:
            full = f"{location}.{missing.group(1)}" if location else missing.group(1)
            return f"{full}: required property is missing"
    return f"{location}: {message}" if location else message


def _format_path(parts: Iterable[str | int], prefix: str = "") -> str:
    out = prefix
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not part or not part.isprintable():
            # A key of the document's (a sysctl name, an annotation) may hold anything: quoted
            # and escaped, so the error stays one line.
            out += f"[{json.dumps(part)}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _semantic_check(raw: Mapping[str, Any], where: str) -> None:
    """The runtime-spec MUSTs a JSON Schema cannot express (or words badly)."""
    process = raw.get("process")
    if process is not None:
        _check_process(process, where, "process")
    for i, mount in enumerate(raw.get("mounts") or ()):
        dest = mount["destination"]
        if not dest.startswith("/"):
            raise ConfigError(where, f"mounts[{i}].destination: {dest!r} must be an absolute path")
    hooks = raw.get("hooks") or {}
    for key, _attr in HOOK_KINDS:
        for i, hook in enumerate(hooks.get(key) or ()):
            if not hook["path"].startswith("/"):
                raise ConfigError(
                    where, f"hooks.{key}[{i}].path: {hook['path']!r} must be an absolute path"
                )
    linux = raw.get("linux") or {}
    seen: set[str] = set()
    for i, ns in enumerate(linux.get("namespaces") or ()):
        if ns["type"] in seen:
            raise ConfigError(
                where, f"linux.namespaces[{i}]: duplicate namespace type {ns['type']!r}"
            )
        seen.add(ns["type"])
        ns_path = ns.get("path", "")
        if ns_path and not ns_path.startswith("/"):
            raise ConfigError(
                where, f"linux.namespaces[{i}].path: {ns_path!r} must be an absolute path"
            )


def _check_process(process: Mapping[str, Any], where: str, prefix: str) -> None:
    cwd = process["cwd"]
    if not cwd.startswith("/"):
        raise ConfigError(where, f"{prefix}.cwd: {cwd!r} must be an absolute path")
    if not process["args"]:  # the schema says so too; this keeps parse_process self-sufficient
        raise ConfigError(where, f"{prefix}.args: [] should be non-empty")
    seen: set[str] = set()
    for i, rlimit in enumerate(process.get("rlimits") or ()):
        kind = rlimit["type"]
        if kind not in RLIMIT_TYPES:
            raise ConfigError(where, f"{prefix}.rlimits[{i}].type: unknown rlimit {kind!r}")
        if kind in seen:
            raise ConfigError(where, f"{prefix}.rlimits[{i}]: duplicate rlimit {kind!r}")
        seen.add(kind)
    _check_exec_size(process, where, prefix)


def _check_exec_size(process: Mapping[str, Any], where: str, prefix: str) -> None:
    """``args`` and ``env`` no kernel could execve (EXEC_ARGS_CEILING), named in the error."""
    env: dict[str, str] = {}
    for entry in process.get("env") or ():
        # As the agent builds the environment: the last of a name wins, "=" is required.
        key, sep, value = str(entry).partition("=")
        if sep and key:
            env[key] = value
    sizes = {
        "args": _exec_strings_size(str(arg) for arg in process.get("args") or ()),
        "env": _exec_strings_size(f"{key}={value}" for key, value in env.items()),
    }
    total = sizes["args"] + sizes["env"]
    if total <= EXEC_ARGS_CEILING:
        return
    biggest = max(sizes, key=lambda name: sizes[name])
    if sizes[biggest] > EXEC_ARGS_CEILING:
        what = f"{prefix}.{biggest} is {_mib(sizes[biggest])}"
    else:
        what = f"{prefix}.args and {prefix}.env are {_mib(total)} together"
    raise ConfigError(
        where,
        f"{what}; the kernel accepts at most {_mib(EXEC_ARGS_CEILING)} of a process's "
        "arguments and environment",
    )


def _exec_strings_size(strings: Iterable[str]) -> int:
    """What execve(2) counts for these strings: their bytes, a NUL and a pointer each."""
    return sum(len(s.encode(errors="surrogatepass")) + 1 + EXEC_POINTER_SIZE for s in strings)


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


# --------------------------------------------------------------------------- building


def _build_process(raw: Mapping[str, Any]) -> Process:
    terminal = bool(raw.get("terminal", False))
    size = raw.get("consoleSize")
    user_raw: Mapping[str, Any] = raw.get("user") or {}
    caps_raw: Mapping[str, Any] = raw.get("capabilities") or {}
    umask = user_raw.get("umask")
    oom = raw.get("oomScoreAdj")
    return Process(
        terminal=terminal,
        console_size=(int(size["height"]), int(size["width"])) if terminal and size else None,
        user=User(
            uid=int(user_raw.get("uid", 0)),
            gid=int(user_raw.get("gid", 0)),
            umask=int(umask) if umask is not None else None,
            additional_gids=tuple(int(g) for g in user_raw.get("additionalGids") or ()),
        ),
        args=tuple(raw.get("args") or ()),
        env=tuple(raw.get("env") or ()),
        cwd=raw["cwd"],
        capabilities={name: tuple(caps_raw.get(name) or ()) for name in CAPABILITY_SETS},
        rlimits=tuple(
            Rlimit(type=r["type"], hard=int(r["hard"]), soft=int(r["soft"]))
            for r in raw.get("rlimits") or ()
        ),
        no_new_privileges=bool(raw.get("noNewPrivileges", False)),
        oom_score_adj=int(oom) if oom is not None else None,
    )


def _build_hook(raw: Mapping[str, Any]) -> Hook:
    timeout = raw.get("timeout")
    return Hook(
        path=raw["path"],
        args=tuple(raw.get("args") or ()),
        env=tuple(raw.get("env") or ()),
        timeout=int(timeout) if timeout is not None else None,
    )


def _opt_int(section: Mapping[str, Any], key: str) -> int | None:
    value = section.get(key)
    return int(value) if value is not None else None


def _build_linux(raw: Mapping[str, Any]) -> Linux:
    res: Mapping[str, Any] = raw.get("resources") or {}
    memory: Mapping[str, Any] = res.get("memory") or {}
    cpu: Mapping[str, Any] = res.get("cpu") or {}
    seccomp = raw.get("seccomp")
    return Linux(
        namespaces=tuple(
            Namespace(type=ns["type"], path=ns.get("path", ""))
            for ns in raw.get("namespaces") or ()
        ),
        resources=Resources(
            memory_limit=_opt_int(memory, "limit"),
            cpu_quota=_opt_int(cpu, "quota"),
            cpu_period=_opt_int(cpu, "period"),
            cpu_shares=_opt_int(cpu, "shares"),
            cpus=cpu.get("cpus") or None,
        ),
        masked_paths=tuple(raw.get("maskedPaths") or ()),
        readonly_paths=tuple(raw.get("readonlyPaths") or ()),
        sysctl=dict(raw.get("sysctl") or {}),
        devices=tuple(dict(d) for d in raw.get("devices") or ()),
        uid_mappings=tuple(dict(m) for m in raw.get("uidMappings") or ()),
        gid_mappings=tuple(dict(m) for m in raw.get("gidMappings") or ()),
        cgroups_path=raw.get("cgroupsPath", ""),
        seccomp=dict(seccomp) if seccomp is not None else None,
    )

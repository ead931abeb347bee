"""The guest's Python: the interpreter and only what the agent imports, found by importing it.

The ``bonneville.guest`` package is staged and imported by the host's interpreter (the same one
the image carries); the stdlib modules that end up loaded go in precompiled and sourceless, the
package with its sources and .pycs, the seccomp extension and every shared library they need.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass

from bonneville.backends.image.common import ImageError, read_file

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

    from bonneville.backends.image.cpio import Tree

PYTHON = "/usr/bin/python3.11"
GUEST_PYTHON_ROOT = "/opt/bonneville"  # sys.path entry holding the bonneville package in the VM

# Stdlib modules the agent needs whether or not agent.py exists yet (it is imported on top of
# these once it does): imports done lazily inside functions are only found through this list.
AGENT_BASELINE_IMPORTS: tuple[str, ...] = (
    "os",
    "sys",
    "json",
    "struct",
    "socket",
    "select",
    "selectors",
    "signal",
    "errno",
    "fcntl",
    "termios",
    "tty",
    "pty",
    "ctypes",
    "ctypes.util",
    "base64",
    "time",
    "resource",
    "traceback",
    "encodings",
    "encodings.aliases",
    "encodings.utf_8",
    "encodings.ascii",
    "encodings.latin_1",
)
# Compiled modules from Debian packages the agent imports (lazily, so they are named here):
# libseccomp's bindings (python3-seccomp) compile containers' seccomp profiles. They go into
# the image beside the bonneville package, with the shared libraries they need.
DIST_PACKAGES = "/usr/lib/python3/dist-packages"
GUEST_EXTENSIONS: tuple[str, ...] = ("seccomp",)
GUEST_PACKAGE = "bonneville.guest"
GUEST_REQUIRED_FILES = ("__init__.py", "protocol.py")
AGENT_MODULE = "bonneville.guest.agent"


def guest_package_dir() -> str:
    import bonneville.guest

    return os.path.dirname(os.path.abspath(bonneville.guest.__file__))


def guest_sources(package_dir: str | os.PathLike[str]) -> dict[str, bytes]:
    """The guest package's modules that may go into the image, by file name."""
    sources: dict[str, bytes] = {}
    for name in sorted(os.listdir(package_dir)):
        path = os.path.join(package_dir, name)
        if name.endswith(".py") and not os.path.isdir(path):
            sources[name] = read_file(path)
    for name in GUEST_REQUIRED_FILES:
        if name not in sources:
            raise ImageError(f"{package_dir}/{name} is missing")
    return sources


_DISCOVER = r"""
import sys
sys.path[:0] = sys.argv[1].split(":")
for name in sys.argv[2:]:
    __import__(name)
out = []
for name, mod in sorted(sys.modules.items()):
    spec = getattr(mod, "__spec__", None)
    if spec is None and name != "__main__":
        continue  # made at run time, not imported (Cython's cython_runtime): nothing to pack
    origin = getattr(spec, "origin", None) if spec is not None else None
    loader = type(getattr(mod, "__loader__", None)).__name__
    if isinstance(getattr(mod, "__loader__", None), type):
        loader = mod.__loader__.__name__
    out.append("%s\t%s\t%s" % (name, origin, loader))
sys.stdout.write("\n".join(out) + "\n")
"""

_COMPILE = r"""
import json, py_compile, sys
for src, dst, dfile in json.load(sys.stdin):
    py_compile.compile(src, cfile=dst, dfile=dfile, doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
"""


def python_env() -> dict[str, str]:
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}


def _run_python(args: list[str], stdin: str | None = None) -> str:
    import subprocess

    try:
        proc = subprocess.run(
            [PYTHON, "-I", "-S", "-B", *args],
            input=stdin,
            capture_output=True,
            text=True,
            close_fds=True,
            env=python_env(),
            check=False,
        )
    except OSError as exc:
        raise ImageError(f"cannot run {PYTHON}: {exc}") from exc
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ImageError(f"{PYTHON} failed while preparing the guest image: {last}")
    return proc.stdout


@dataclass(frozen=True)
class PythonModule:
    name: str
    origin: str  # file path, "built-in" or "frozen"
    loader: str


def discover_modules(stage: str, imports: Iterable[str]) -> list[PythonModule]:
    """Every module the guest interpreter ends up holding after importing ``imports``."""
    out = _run_python(["-c", _DISCOVER, stage, *imports])
    mods: list[PythonModule] = []
    for line in out.splitlines():
        name, origin, loader = line.split("\t")
        mods.append(PythonModule(name, origin, loader))
    return mods


def _stdlib_dir() -> str:
    return _run_python(["-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"]).strip()


def shared_libraries(paths: Iterable[str]) -> list[str]:
    """Every shared library (and the dynamic loader) the ELF files at ``paths`` need."""
    import subprocess

    libs: set[str] = set()
    for path in paths:
        try:
            proc = subprocess.run(
                ["ldd", path],
                capture_output=True,
                text=True,
                close_fds=True,
                env=python_env(),
                check=False,
            )
        except OSError as exc:
            raise ImageError(f"cannot run ldd: {exc}") from exc
        if "not a dynamic executable" in proc.stdout + proc.stderr:
            continue
        if proc.returncode != 0:
            raise ImageError(f"ldd {path} failed: {proc.stderr.strip()}")
        for line in proc.stdout.splitlines():
            line = line.strip()
            if "=>" in line:
                target = line.split("=>", 1)[1].strip().split(" ", 1)[0]
                if target == "not":
                    raise ImageError(f"{path}: missing shared library: {line}")
            else:
                target = line.split(" ", 1)[0]
            if target.startswith("/"):
                libs.add(target)
    return sorted(libs)


def _cache_tag() -> str:
    """The interpreter's .pyc tag (python3.11 -> cpython-311)."""
    return "cpython-" + os.path.basename(PYTHON).removeprefix("python").replace(".", "")


def _compile(jobs: list[tuple[str, str, str]]) -> None:
    if jobs:
        _run_python(["-c", _COMPILE], stdin=json.dumps(jobs))


def extension_files() -> dict[str, str]:
    """GUEST_EXTENSIONS' files (module name → path); ImageError if one is not installed."""
    try:
        names = sorted(os.listdir(DIST_PACKAGES))
    except OSError:
        names = []
    found = {}
    for name in GUEST_EXTENSIONS:
        matches = [
            os.path.join(DIST_PACKAGES, n)
            for n in names
            if n.startswith(f"{name}.cpython-") and n.endswith(".so")
        ]
        if not matches:
            raise ImageError(f"{name}: no {DIST_PACKAGES}/{name}.*.so (install.sh installs it)")
        found[name] = matches[-1]
    return found


def add_python(tree: Tree, work: Path, package_dir: str) -> list[str]:
    """Stage the agent package, find what it imports, add interpreter + modules; return names."""
    sources = guest_sources(package_dir)
    stage = work / "stage"
    (stage / "bonneville" / "guest").mkdir(parents=True)
    (stage / "bonneville" / "__init__.py").write_bytes(b"")
    for name, data in sources.items():
        (stage / "bonneville" / "guest" / name).write_bytes(data)
    imports = [f"{GUEST_PACKAGE}.protocol", *AGENT_BASELINE_IMPORTS, *GUEST_EXTENSIONS]
    if "agent.py" in sources:
        imports.append(AGENT_MODULE)
    mods = discover_modules(f"{stage}:{DIST_PACKAGES}", imports)

    stdlib = _stdlib_dir().rstrip("/") + "/"
    stage_prefix = str(stage) + "/"
    compile_jobs: list[tuple[str, str, str]] = []
    extensions: list[str] = []
    names: list[str] = []
    guest_files = {"__init__.py", *GUEST_REQUIRED_FILES}
    for mod in mods:
        if mod.name == "__main__":
            continue
        names.append(mod.name)
        origin = mod.origin
        if mod.loader in ("BuiltinImporter", "FrozenImporter") or not origin.startswith("/"):
            continue
        if origin.startswith(stage_prefix):
            if mod.name.startswith(GUEST_PACKAGE + "."):
                guest_files.add(os.path.basename(origin))
            continue
        if mod.name in GUEST_EXTENSIONS and origin.startswith(DIST_PACKAGES + "/"):
            extensions.append(origin)
            tree.file(f"{GUEST_PYTHON_ROOT}/{os.path.basename(origin)}", read_file(origin), 0o755)
            continue
        if not origin.startswith(stdlib):
            raise ImageError(f"guest module {mod.name} comes from outside the stdlib: {origin}")
        if origin.endswith(".so"):
            extensions.append(origin)
            tree.copy_host_path(origin)
        elif origin.endswith(".py"):
            dest = work / "pyc" / (origin[len(stdlib) :] + "c")
            compile_jobs.append((origin, str(dest), origin))
        else:
            raise ImageError(f"guest module {mod.name}: unexpected file {origin}")
    # getpath looks for os.py(c) to find the stdlib even though os itself is frozen.
    compile_jobs.append((stdlib + "os.py", str(work / "pyc" / "os.pyc"), stdlib + "os.py"))
    # The agent package keeps its sources next to unchecked-hash .pycs: readable tracebacks.
    guest_dest = f"{GUEST_PYTHON_ROOT}/bonneville/guest"
    for name in sorted(guest_files):
        src = stage / "bonneville" / "guest" / name
        pyc = f"{name[:-3]}.{_cache_tag()}.pyc"
        compile_jobs.append(
            (str(src), str(work / "guest" / pyc), f"{guest_dest}/{name}"),
        )
        tree.file(f"{guest_dest}/{name}", src.read_bytes())
    compile_jobs.append(
        (str(stage / "bonneville" / "__init__.py"), str(work / "root-init.pyc"), "")
    )
    tree.file(f"{GUEST_PYTHON_ROOT}/bonneville/__init__.py", b"")
    _compile(compile_jobs)
    for source, compiled, _ in compile_jobs:
        data = read_file(compiled)
        if source.startswith(stdlib):
            tree.file(source + "c", data)  # sourceless: the .pyc sits where the .py would
        elif compiled.endswith("root-init.pyc"):
            tree.file(
                f"{GUEST_PYTHON_ROOT}/bonneville/__pycache__/__init__.{_cache_tag()}.pyc", data
            )
        else:
            tree.file(f"{guest_dest}/__pycache__/{os.path.basename(compiled)}", data)
    # getpath also wants lib-dynload to exist to settle exec_prefix.
    tree.directory(stdlib + "lib-dynload")

    tree.copy_host_path(PYTHON)
    tree.symlink("/usr/bin/python3", os.path.basename(PYTHON))
    for lib in shared_libraries([PYTHON, *extensions]):
        tree.copy_host_path(lib)
    listed = sorted(n for n in names if n != "__main__")
    tree.file("etc/bonneville/python-modules", "".join(n + "\n" for n in listed).encode())
    return listed

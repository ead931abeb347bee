"""The monitor's early start (shim/launch.py): which commands get one, what it imports, and that
a `create` that fails first leaves it behind nowhere."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import pytest

from bonneville.shim import entry
from bonneville.shim.cli import cli
from tests.support import (
    CHECKOUT,
    Runtime,
    default_config,
    leftover_processes,
    modules_imported_by,
    write_bundle,
)


@pytest.mark.parametrize(
    ("argv", "command", "backend"),
    [
        (["create", "--bundle", "b", "c1"], "create", None),
        (["--root", "/run/x", "--log", "/l", "--log-format", "json", "run", "c1"], "run", None),
        (["--root", "create", "delete", "c1"], "delete", None),  # a value, not the command
        (["--backend", "fake", "create", "c1"], "create", "fake"),
        (["--backend=libvirt", "--debug", "run", "c1"], "run", "libvirt"),
        (["--systemd-cgroup", "state", "create"], "state", None),  # an id named create
        (["--debug"], None, None),
        ([], None, None),
    ],
)
def test_the_command_is_found_past_the_global_options(
    argv: list[str], command: str | None, backend: str | None
) -> None:
    assert entry.command_of(argv) == (command, backend)


def test_the_options_taking_a_value_are_the_clis() -> None:
    """command_of must skip exactly the values of cli's global options (else it misreads
    `--root create` as the create command, or misses one)."""
    takes_value = {
        name
        for param in cli.params
        if isinstance(param, click.Option) and not param.is_flag and not param.count
        for name in param.opts
        if name.startswith("--")
    }
    assert takes_value == entry.VALUE_OPTIONS


def test_the_monitor_imports_no_cli_and_no_typing(tmp_path: Path) -> None:
    """What a monitor imports stays in memory as long as its container runs (docs/benchmarks.md):
    not click, jsonschema, typing or pathlib, nor the image builder's modules."""
    # The package as the launcher sees it (install.sh): the checkout first, no site.
    probe = """
import json, sys
sys.path.insert(0, sys.argv[1])
from bonneville.shim import launch, monitor
monitor._preload("qemu")
print(json.dumps(sorted(sys.modules)))
"""
    out = subprocess.run(
        [sys.executable, "-S", "-c", probe, str(CHECKOUT)],
        capture_output=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", "BONNEVILLE_CONFIG": str(tmp_path / "no-config.toml")},
    ).stdout
    modules = set(json.loads(out))
    assert "bonneville.backends.qemu.machine" in modules  # preloaded: what a launch uses
    assert "bonneville.backends.image" in modules
    for unwanted in ("click", "jsonschema", "typing", "pathlib", "tomllib", "gzip", "tempfile"):
        assert unwanted not in modules


def test_the_qemu_backend_of_other_commands_imports_no_launch_machinery(tmp_path: Path) -> None:
    """state, start, kill and delete ask the backend whether a VM lives or to end it: that must
    not import what launching QEMU takes (machine.py, the template and QMP code, ctypes…),
    ~10 ms of each such CLI call."""
    probe = """
import json, sys
from bonneville.backends.base import get_backend
backend = get_backend("qemu")
backend.alive({"pid": 0})
backend.destroy({"pid": 0})
print(json.dumps(sorted(sys.modules)))
"""
    modules = modules_imported_by(probe)
    assert "bonneville.backends.qemu.backend" in modules
    for unwanted in (
        "bonneville.backends.qemu.machine",
        "bonneville.backends.qemu.template",
        "bonneville.backends.qemu.qmp",
        "ctypes",
        "hashlib",
    ):
        assert unwanted not in modules


def test_a_create_that_fails_leaves_no_early_monitor(tmp_path: Path) -> None:
    rt = Runtime(tmp_path / "state", "fake")
    bad = write_bundle(tmp_path / "bundle", {**default_config(["true"]), "ociVersion": 5})
    for args in (
        ("create", "--bundle", str(tmp_path / "missing"), "c1"),
        ("create", "--bundle", str(bad), "c1"),
        ("create", "--bundle", str(bad), "bad/id"),
        ("run", "--no-such-flag", "c1"),
    ):
        result = rt(*args)
        assert result.returncode != 0
        assert leftover_processes(str(rt.root)) == []
    rt.cleanup()


@pytest.mark.parametrize(("code", "status"), [(None, 0), (0, 0), (3, 3), ("bad flag", 1)])
def test_the_launcher_exits_as_python_would(
    code: object, status: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """entry.main ends with os._exit (no interpreter teardown): sys.exit's meaning is kept."""
    assert entry.exit_status(code) == status
    assert capsys.readouterr().err == (f"{code}\n" if isinstance(code, str) else "")


def test_the_launcher_flushes_what_the_cli_wrote(tmp_path: Path) -> None:
    """Output the CLI buffered (stdout to a pipe is block-buffered) survives the os._exit, as
    does the --log file's last line."""
    log = tmp_path / "log.json"
    out = subprocess.run(
        ["bonneville", "--log", str(log), "--log-format", "json", "state", "nosuch"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1
    assert out.stderr == "bonneville: container nosuch does not exist\n"
    assert "container nosuch does not exist" in json.loads(log.read_text().splitlines()[-1])["msg"]
    probe = "import sys; from bonneville.shim import entry; print('buffered'); entry.leave(4)"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}  # no PYTHONUNBUFFERED
    left = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    assert (left.returncode, left.stdout) == (4, "buffered\n")


# (global options, command arguments, whether the launcher answers it without the CLI)
DELETE_CASES = [
    (["--root", "{root}"], ["delete", "--force", "gone"], True),
    (
        ["--root={root}", "--log", "{log}", "--log-format", "json"],
        ["delete", "-f", "gone"],
        True,
    ),
    (["--root", "{root}", "--systemd-cgroup"], ["delete", "gone", "--force"], True),
    (
        ["--backend", "libvirt", "--libvirt-uri=qemu:///embed", "--root", "{root}"],
        ["delete", "--force", "gone"],
        True,
    ),
    (["--root", "{root}"], ["delete", "gone"], False),  # not forced: an error
    (["--root", "{root}"], ["delete", "--force", "../x"], False),  # a bad id
    (["--root", "{root}", "--log-format", "yaml"], ["delete", "--force", "gone"], False),
    (["--root", "{root}"], ["delete", "--force", "gone", "more"], False),
    (["--root", "{root}", "--log", "{root}/no/dir/log"], ["delete", "--force", "gone"], False),
    (["--root", "{root}"], ["delete", "--force", "half"], False),  # exists: the CLI's
    (["--root", "{root}", "--debug"], ["delete", "--force", "gone"], False),
]


@pytest.mark.parametrize(("options", "command", "shortcut"), DELETE_CASES)
def test_the_launchers_delete_shortcut_answers_as_the_cli(
    tmp_path: Path, options: list[str], command: list[str], shortcut: bool
) -> None:
    """containerd's `delete --force ID` after every delete is answered by the launcher when
    the container is gone (entry.deleted_already of entry.plain_call): its exit status,
    output, log file and --root must be the CLI's own, for that shape and for the shapes it
    leaves to the CLI."""
    outcomes = []
    for name, program in (("launcher", ["bonneville"]), ("cli", [sys.executable, "-c", CLI])):
        root = tmp_path / name / "root"
        (root / "half").mkdir(parents=True)  # a create that died before its state file
        log = tmp_path / name / "log.json"
        argv = [a.format(root=root, log=log) for a in options + command]
        if name == "launcher":
            call = entry.plain_call(argv)
            assert (call is not None and entry.deleted_already(call)) is shortcut
        result = subprocess.run(program + argv, capture_output=True, text=True)
        outcomes.append(
            (
                result.returncode,
                result.stdout,
                result.stderr.replace(str(tmp_path / name), "T"),
                log.exists(),
                sorted(p.name for p in root.iterdir()),
            )
        )
    assert outcomes[0] == outcomes[1]


CLI = "import sys; from bonneville.shim.cli import main; sys.argv[0] = 'bonneville'; main()"


@pytest.mark.parametrize(
    ("argv", "plain"),
    [
        (["start", "c1"], ("start", "c1", False, {}, False)),
        (
            ["--root", "/r", "--log=/l", "--log-format", "json", "state", "c1"],
            ("state", "c1", False, {"--root": "/r", "--log": "/l", "--log-format": "json"}, False),
        ),
        (["--systemd-cgroup", "--debug", "delete", "c1", "-f"], ("delete", "c1", True, {}, True)),
        (["delete", "--force", "--force", "c1"], ("delete", "c1", True, {}, False)),
        (
            ["--backend", "fake", "--libvirt-uri=qemu:///embed", "delete", "c1"],
            ("delete", "c1", False, {"--backend": "fake", "--libvirt-uri": "qemu:///embed"}, False),
        ),
        (["state", "--force"], None),  # the id would be a flag
        (["start", "-f", "c1"], None),  # --force is delete's
        (["start", "c1", "c2"], None),
        (["start"], None),
        (["state", "--help"], None),
        (["--help", "state", "c1"], None),
        (["--root", "--debug", "state", "c1"], None),  # click would take --debug as the root
        (["--root", "", "state", "c1"], None),
        (["--root"], None),
        (["--log-format", "yaml", "state", "c1"], None),
        (["--debug=1", "state", "c1"], None),
        (["kill", "c1"], None),
        (["delete", "--force=true", "c1"], None),
    ],
)
def test_the_plain_calls_are_recognised(argv: list[str], plain: tuple[object, ...] | None) -> None:
    call = entry.plain_call(argv)
    if plain is None:
        assert call is None
    else:
        assert call is not None
        assert (call.command, call.container_id, call.force, call.options, call.debug) == plain


def test_the_plain_calls_answer_as_the_cli(tmp_path: Path) -> None:
    """start, state and delete without click (entry.run_plain) answer exactly as the CLI does,
    along a container's life and its errors: exit status, stdout, stderr, the --log file."""
    bundle = write_bundle(tmp_path / "bundle", default_config(["sleep", "30"]))
    steps: list[list[str]] = [
        ["state", "c1"],  # does not exist
        ["start", "c1"],
        ["delete", "c1"],
        ["state", "bad/id"],
        ["create", "--bundle", str(bundle), "c1"],  # the CLI's in both
        ["state", "c1"],
        ["start", "c1"],
        ["start", "c1"],  # running already
        ["delete", "c1"],  # running: refused
        ["state", "c1"],
        ["delete", "-f", "c1"],
        ["state", "c1"],
    ]
    outcomes = []
    for name, program in (("launcher", ["bonneville"]), ("cli", [sys.executable, "-c", CLI])):
        root = tmp_path / name / "root"
        log = tmp_path / name / "log.json"
        log.parent.mkdir()
        options = ["--root", str(root), "--backend", "fake", "--log", str(log), "--log-format"]
        options.append("json")
        seen = []
        try:
            for step in steps:
                if name == "launcher" and step[0] != "create":
                    assert entry.plain_call([*options, *step]) is not None, step
                # Files, not pipes: create's monitor keeps its stdio open.
                with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
                    result = subprocess.run(
                        [*program, *options, *step],
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=err,
                    )
                    out.seek(0)
                    err.seek(0)
                    stdout, stderr = out.read().decode(), err.read().decode()
                if step[0] == "state" and result.returncode == 0:
                    state = json.loads(stdout)
                    assert state["pid"] > 0 and state["created"]
                    stdout = json.dumps({**state, "pid": 0, "created": ""}, indent=2)
                seen.append((step, result.returncode, stdout, stderr.replace(str(root), "R")))
            entries = [json.loads(line) for line in log.read_text().splitlines()]
            seen.append([(e["level"], e["msg"]) for e in entries])
        finally:
            subprocess.run([*program, *options, "delete", "--force", "c1"], capture_output=True)
        outcomes.append(seen)
        assert leftover_processes(str(root)) == []
    assert outcomes[0] == outcomes[1]
    statuses = [returncode for _, returncode, _, _ in outcomes[0][:-1]]
    assert statuses == [1, 1, 1, 1, 0, 0, 0, 1, 1, 0, 0, 1]


def test_the_plain_calls_import_no_click(tmp_path: Path) -> None:
    """run_plain exists to spare start, state and delete click's import (~20 ms a call)."""
    probe = """
import contextlib, io, json, sys
from bonneville.shim import entry
for command in ("state", "start", "delete"):
    call = entry.plain_call(["--root", sys.argv[1], command, "gone"])
    with contextlib.suppress(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        entry.run_plain(call)
print(json.dumps(sorted(sys.modules)))
"""
    modules = modules_imported_by(probe, str(tmp_path))
    assert {"bonneville.shim.lifecycle.running", "bonneville.shim.lifecycle.query"} <= modules
    assert "click" not in modules and "bonneville.shim.cli" not in modules

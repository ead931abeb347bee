"""Property-based fuzzing of config.json and the CLI's arguments: whatever the input, one clear
error line and exit 1 (or success), never a traceback, and nothing left under --root."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bonneville.spec.config import load_bundle
from bonneville.spec.errors import BonnevilleError
from tests.support import default_config, make_busybox_rootfs

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)

# Keys of config.json: mutate real configs, not just random objects (those stop at the schema).
PATHS = [
    ("process",),
    ("process", "args"),
    ("process", "user"),
    ("process", "user", "uid"),
    ("process", "env"),
    ("process", "cwd"),
    ("process", "rlimits"),
    ("process", "capabilities"),
    ("process", "terminal"),
    ("process", "consoleSize"),
    ("root",),
    ("root", "path"),
    ("root", "readonly"),
    ("mounts",),
    ("hostname",),
    ("hooks",),
    ("hooks", "prestart"),
    ("linux",),
    ("linux", "namespaces"),
    ("linux", "resources"),
    ("linux", "resources", "memory"),
    ("linux", "maskedPaths"),
    ("linux", "sysctl"),
    ("annotations",),
    ("ociVersion",),
]


def _mutate(config: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    node: Any = config
    for key in path[:-1]:
        if not isinstance(node, dict):
            return config
        node = node.setdefault(key, {})
    if isinstance(node, dict):
        node[path[-1]] = value
    return config


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_busybox_rootfs(tmp_path_factory.mktemp("fuzz") / "rootfs")


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(PATHS), value=JSON)
def test_config_loader_raises_only_config_errors(
    rootfs: Path, tmp_path_factory: pytest.TempPathFactory, path: tuple[str, ...], value: Any
) -> None:
    bundle = tmp_path_factory.mktemp("b")
    (bundle / "rootfs").symlink_to(rootfs)
    config = _mutate(default_config(["true"]), path, value)
    (bundle / "config.json").write_text(json.dumps(config))
    try:
        load_bundle(str(bundle))
    except BonnevilleError as exc:
        assert str(exc) and "\n" not in str(exc).strip()


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=300))
def test_config_bytes_raise_only_config_errors(
    rootfs: Path, tmp_path_factory: pytest.TempPathFactory, raw: bytes
) -> None:
    bundle = tmp_path_factory.mktemp("b")
    (bundle / "rootfs").symlink_to(rootfs)
    (bundle / "config.json").write_bytes(raw)
    with pytest.raises(BonnevilleError):
        load_bundle(str(bundle))


COMMANDS = ["create", "start", "state", "kill", "delete", "list", "pause", "resume", "ps", "exec"]
ARG = st.sampled_from(
    [
        "--bundle",
        "-b",
        "--pid-file",
        "--force",
        "--all",
        "--format",
        "json",
        "-f",
        "KILL",
        "9",
        "--console-socket",
        "/nonexistent",
        "--process",
        "--detach",
        "",
        "..",
        "a/b",
        "-",
        "--",
    ]
) | st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"), max_size=12
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(command=st.sampled_from(COMMANDS), args=st.lists(ARG, max_size=4))
def test_cli_arguments_never_traceback(
    tmp_path_factory: pytest.TempPathFactory, command: str, args: list[str]
) -> None:
    root = tmp_path_factory.mktemp("root")
    work = tmp_path_factory.mktemp("cwd")  # a relative --bundle or --pid-file lands here
    result = subprocess.run(
        ["bonneville", "--root", str(root / "state"), "--backend", "fake", command, *args],
        cwd=work,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert b"Traceback" not in result.stderr, result.stderr
    if result.returncode != 0:
        assert result.returncode == 1
        lines = result.stderr.decode(errors="replace").splitlines()
        assert len(lines) == 1 and lines[0].startswith("bonneville: "), lines
        state = root / "state"
        assert not state.exists() or os.listdir(state) == [], "a failed command left state"

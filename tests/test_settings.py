"""The configuration file: precedence flag > environment > file > default, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from bonneville.shim.lifecycle.context import Context
from bonneville.shim.state import Store
from bonneville.spec import settings
from bonneville.spec.errors import ConfigError


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    settings._load.cache_clear()


def _write(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return {settings.CONFIG_ENV: str(path)}


def test_missing_file_gives_defaults(tmp_path: Path) -> None:
    environ = {settings.CONFIG_ENV: str(tmp_path / "absent.toml")}
    assert settings.get("runtime", "backend", default="qemu", environ=environ) == "qemu"


def test_environment_beats_file(tmp_path: Path) -> None:
    environ = _write(tmp_path, '[runtime]\nbackend = "libvirt"\n')
    assert settings.get("runtime", "backend", env="B", environ=environ) == "libvirt"
    environ["B"] = "fake"
    assert settings.get("runtime", "backend", env="B", environ=environ) == "fake"


def test_booleans(tmp_path: Path) -> None:
    environ = _write(tmp_path, "[qemu]\nclone = false\n")
    assert settings.get_bool("qemu", "clone", env="C", default=True, environ=environ) is False
    environ["C"] = "yes"
    assert settings.get_bool("qemu", "clone", env="C", default=False, environ=environ) is True
    environ["C"] = "maybe"
    with pytest.raises(ConfigError, match=r"\$C: qemu.clone must be true or false"):
        settings.get_bool("qemu", "clone", env="C", default=False, environ=environ)


@pytest.mark.parametrize(
    ("text", "reason"),
    [("[runtime\n", "not valid TOML"), ('runtime = "x"\n', r"'runtime' must be a \[table\]")],
)
def test_bad_file_is_an_error(tmp_path: Path, text: str, reason: str) -> None:
    environ = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=reason):
        settings.section("runtime", environ)


def test_create_backend_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    environ = _write(tmp_path, '[runtime]\nbackend = "fake"\n')
    monkeypatch.setenv(settings.CONFIG_ENV, environ[settings.CONFIG_ENV])
    monkeypatch.delenv("BONNEVILLE_BACKEND", raising=False)
    store = Store(str(tmp_path / "root"))
    assert Context(store).backend_for_create() == "fake"
    monkeypatch.setenv("BONNEVILLE_BACKEND", "qemu")
    assert Context(store).backend_for_create() == "qemu"
    assert Context(store, backend="libvirt").backend_for_create() == "libvirt"

"""The runtime's configuration file: host-wide defaults that no runc flag can carry.

dockerd and containerd call us with runc's flags only, so choices such as the backend, the libvirt
URI or a vCenter's address come from ``/etc/bonneville/config.toml`` (``$BONNEVILLE_CONFIG``
names another file). Precedence, highest first: a command-line flag, an environment variable,
the file, the built-in default. The file is optional; a file that exists but cannot be parsed is
an error (a typo must not silently select another backend). Secrets are never read from here
directly into process arguments or state files: backends take file paths for them.

    [runtime]
    backend = "qemu"            # qemu | libvirt | vsphere

    [qemu]
    clone = true                # start VMs from pre-booted templates

    [libvirt]
    uri = "qemu:///system"

    [vsphere]
    url = "https://vcenter.example/sdk"
    ca_file = "/etc/bonneville/vcenter-ca.pem"  # or thumbprint = "sha256:AB:…" (a pin)

(backends/vsphere/config.py and docs/backends.md have every [vsphere] key.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import cache

from bonneville.spec.errors import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

CONFIG_ENV = "BONNEVILLE_CONFIG"
DEFAULT_CONFIG = "/etc/bonneville/config.toml"


def config_path(environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    return environ.get(CONFIG_ENV) or DEFAULT_CONFIG


@cache
def _load(path: str) -> dict[str, Any]:
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(path, exc.strerror or str(exc)) from exc
    import tomllib  # only with a file: it costs every monitor ~0.5 MiB (typing with it)

    with f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(path, f"not valid TOML: {exc}") from exc
        except OSError as exc:
            raise ConfigError(path, exc.strerror or str(exc)) from exc
    for section, value in data.items():
        if not isinstance(value, dict):
            raise ConfigError(path, f"{section!r} must be a [table]")
    return data


def section(name: str, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """One ``[name]`` table of the configuration file (empty if absent)."""
    return dict(_load(config_path(environ)).get(name, {}))


def get(
    section_name: str,
    key: str,
    *,
    env: str | None = None,
    default: Any = None,
    environ: Mapping[str, str] | None = None,
) -> Any:
    """A setting: the environment variable ``env`` if set, else the file's value, else default."""
    environ = os.environ if environ is None else environ
    if env is not None and environ.get(env):
        return environ[env]
    value = section(section_name, environ).get(key)
    return default if value is None else value


def get_bool(
    section_name: str,
    key: str,
    *,
    env: str | None = None,
    default: bool,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """A yes/no setting; environment values are 1/0, true/false, yes/no, on/off."""
    value = get(section_name, key, env=env, default=default, environ=environ)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    where = f"${env}" if env and (environ or os.environ).get(env) else config_path(environ)
    raise ConfigError(where, f"{section_name}.{key} must be true or false, not {value!r}")

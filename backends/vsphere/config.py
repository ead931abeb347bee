"""vSphere settings: the `[vsphere]` table of the config file and `BONNEVILLE_VSPHERE_*`.

The password is read from `$BONNEVILLE_VSPHERE_PASSWORD` or from the file `password_file` names
(never from the config file itself, never from argv). It lives only in this object, whose repr
hides it; nothing here writes it to a state file or a log.

TLS (`tls.py`): the server's certificate is verified against the system's CAs, or against
`ca_file` (`$BONNEVILLE_VSPHERE_CA_FILE`) alone when set. `thumbprint`
(`$BONNEVILLE_VSPHERE_THUMBPRINT`, `sha256:AB:CD:…` or the 64 hex digits bare) pins the server's
certificate instead, as a self-signed ESXi host needs; `insecure = true`
(`$BONNEVILLE_VSPHERE_INSECURE`) turns verification off, with a warning in the log at every
session. They exclude one another. `verify_tls = false`, the older spelling of
`insecure = true`, is still read.

The VM's NIC on `network` is addressed by the guest (`addressing.py`): `net_mode = "dhcp"` (the
default with a `network`), or `"static"` with `static_range` (`FIRST-LAST/PREFIX`, one address
leased per running container), an optional `gateway` and `dns` (a list, or in the environment a
comma- or space-separated string); `"none"` leaves it unaddressed.
"""

from __future__ import annotations

import ipaddress
import os
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bonneville.backends.vsphere.addressing import NET_MODES, parse_ipv4, parse_range
from bonneville.backends.vsphere.tls import format_thumbprint, parse_thumbprint
from bonneville.spec import settings
from bonneville.spec.errors import ConfigError

SECTION = "vsphere"
ENV_PREFIX = "BONNEVILLE_VSPHERE_"
PASSWORD_ENV = ENV_PREFIX + "PASSWORD"


def _env(key: str) -> str:
    return ENV_PREFIX + key.upper()


@dataclass(frozen=True)
class VSphereSettings:
    url: str  # https://vcenter.example/sdk (http only for vcsim)
    username: str
    password: str = field(repr=False)
    datacenter: str = ""  # empty: the only datacenter
    cluster: str = ""  # a cluster's default resource pool, or
    resource_pool: str = ""  # an inventory path under the datacenter's host folder
    datastore: str = ""  # empty: the only datastore
    folder: str = ""  # VM folder under the datacenter's vm folder; empty: its root
    network: str = ""  # port group name; empty: no NIC
    ca_file: str = ""  # the CAs to verify the server against; empty: the system's
    thumbprint: str = ""  # sha256:AB:CD:… of the server's certificate: trust it alone
    insecure: bool = False  # no verification at all (a warning at every session)
    # Where the monitor listens for the VM's network serial port, and the address the ESXi host
    # is told to connect to (the runtime host as ESXi reaches it).
    listen_host: str = "0.0.0.0"
    advertise_host: str = ""
    agent_timeout: float = 120.0  # power-on to the agent's connection
    # "auto": instant clone when the server can, then linked clone, then full create.
    clone_mode: str = "auto"
    template_prefix: str = "bonneville-template"
    # How the guest addresses its NIC on ``network``: "dhcp", "static" (from static_range) or
    # "none". load() makes "dhcp" the default when there is a network.
    net_mode: str = "none"
    static_range: str = ""  # FIRST-LAST/PREFIX, validated by load()
    gateway: str = ""
    dns: tuple[str, ...] = ()

    @property
    def host(self) -> str:
        return urllib.parse.urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urllib.parse.urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def scheme(self) -> str:
        return urllib.parse.urlsplit(self.url).scheme

    @property
    def path(self) -> str:
        return urllib.parse.urlsplit(self.url).path or "/sdk"


CLONE_MODES = ("auto", "instant", "linked", "full")

_STRINGS = (
    "datacenter",
    "cluster",
    "resource_pool",
    "datastore",
    "folder",
    "network",
    "ca_file",
    "listen_host",
    "advertise_host",
    "template_prefix",
)


def load(environ: Mapping[str, str] | None = None) -> VSphereSettings:
    """The settings from the environment and the config file; ConfigError names what is wrong."""
    environ = os.environ if environ is None else environ
    where = settings.config_path(environ)

    def get(key: str, default: str = "") -> str:
        value = settings.get(SECTION, key, env=_env(key), default=default, environ=environ)
        return str(value)

    url = get("url")
    if not url:
        raise ConfigError(where, f"vsphere.url is not set (or ${_env('url')})")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(where, f"vsphere.url {url!r} is not an http(s) URL")
    if parts.username or parts.password:
        raise ConfigError(where, "vsphere.url must not carry credentials: use username/password")
    username = get("username")
    if not username:
        raise ConfigError(where, f"vsphere.username is not set (or ${_env('username')})")
    password = _password(environ, where)
    insecure = _insecure(environ)
    timeout_text = get("agent_timeout", "120")
    try:
        agent_timeout = float(timeout_text)
    except ValueError as exc:
        raise ConfigError(where, f"vsphere.agent_timeout {timeout_text!r} is not seconds") from exc
    clone_mode = get("clone_mode", "auto")
    if clone_mode not in CLONE_MODES:
        raise ConfigError(where, f"vsphere.clone_mode must be one of {', '.join(CLONE_MODES)}")
    values = {key: get(key) for key in _STRINGS}
    values["listen_host"] = values["listen_host"] or "0.0.0.0"
    values["template_prefix"] = values["template_prefix"] or "bonneville-template"
    if values["ca_file"] and not os.path.isfile(values["ca_file"]):
        raise ConfigError(where, f"vsphere.ca_file {values['ca_file']} does not exist")
    thumbprint = _thumbprint(get("thumbprint"), where)
    net = _net_settings(environ, where, values["network"], get)
    _one_trust(
        where, parts.scheme, ca_file=values["ca_file"], thumbprint=thumbprint, insecure=insecure
    )
    return VSphereSettings(
        url=url,
        username=username,
        password=password,
        thumbprint=thumbprint,
        insecure=insecure,
        agent_timeout=agent_timeout,
        clone_mode=clone_mode,
        net_mode=net["net_mode"],
        static_range=net["static_range"],
        gateway=net["gateway"],
        dns=net["dns"],
        **values,
    )


def _net_settings(
    environ: Mapping[str, str], where: str, network: str, get: Callable[..., str]
) -> dict[str, Any]:
    """net_mode, static_range, gateway and dns, checked together."""
    mode = get("net_mode", "dhcp" if network else "none").strip().lower()
    if mode not in NET_MODES:
        raise ConfigError(where, f"vsphere.net_mode must be one of {', '.join(NET_MODES)}")
    if mode != "none" and not network:
        raise ConfigError(where, f"vsphere.net_mode {mode} needs vsphere.network (a port group)")
    pool, gateway = get("static_range").strip(), get("gateway").strip()
    raw_dns = settings.get(SECTION, "dns", env=_env("dns"), default=[], environ=environ)
    if isinstance(raw_dns, str):
        raw_dns = raw_dns.replace(",", " ").split()
    if not isinstance(raw_dns, list):
        raise ConfigError(where, "vsphere.dns must be a list of IPv4 addresses")
    try:
        dns = tuple(parse_ipv4(str(server), "vsphere.dns entry") for server in raw_dns)
        if gateway:
            gateway = parse_ipv4(gateway, "vsphere.gateway")
        if mode == "static":
            if not pool:
                raise ValueError("vsphere.net_mode static needs vsphere.static_range")
            subnet = parse_range(pool).network
            if gateway and ipaddress.IPv4Address(gateway) not in subnet:
                raise ValueError(f"vsphere.gateway {gateway} is not in {subnet}")
    except ValueError as exc:
        text = str(exc)
        raise ConfigError(
            where, text if text.startswith("vsphere.") else f"vsphere.static_range {text}"
        ) from exc
    if mode != "static" and (pool or gateway or dns):
        raise ConfigError(
            where, 'vsphere.static_range, gateway and dns are for vsphere.net_mode = "static"'
        )
    return {"net_mode": mode, "static_range": pool, "gateway": gateway, "dns": dns}


def _thumbprint(text: str, where: str) -> str:
    """The pin in its canonical spelling (sha256:AB:CD:…), "" for none."""
    if not text:
        return ""
    try:
        return format_thumbprint(parse_thumbprint(text))
    except ValueError as exc:
        raise ConfigError(where, f"vsphere.{exc}") from exc


def _one_trust(where: str, scheme: str, **choices: object) -> None:
    """At most one way to trust the server; a pin or `insecure` only where there is TLS."""
    chosen = [name for name, value in choices.items() if value]
    if len(chosen) > 1:
        raise ConfigError(
            where, f"vsphere.{' and vsphere.'.join(chosen)} exclude one another: set one"
        )
    if chosen and chosen[0] != "ca_file" and scheme != "https":
        raise ConfigError(where, f"vsphere.{chosen[0]} needs an https url")


def _insecure(environ: Mapping[str, str]) -> bool:
    """`insecure`, or its older spelling `verify_tls = false` (settings files kept working)."""
    insecure = settings.get_bool(
        SECTION, "insecure", env=_env("insecure"), default=False, environ=environ
    )
    verify = settings.get_bool(
        SECTION, "verify_tls", env=_env("verify_tls"), default=True, environ=environ
    )
    return insecure or not verify


def _password(environ: Mapping[str, str], where: str) -> str:
    if environ.get(PASSWORD_ENV):
        return environ[PASSWORD_ENV]
    if settings.section(SECTION, environ).get("password") is not None:
        raise ConfigError(
            where,
            "vsphere.password is not read from the config file: use "
            f"password_file or ${PASSWORD_ENV}",
        )
    path = str(
        settings.get(
            SECTION, "password_file", env=_env("password_file"), default="", environ=environ
        )
    )
    if not path:
        raise ConfigError(
            where, f"no vSphere password: set ${PASSWORD_ENV} or vsphere.password_file"
        )
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(path, f"cannot read the vSphere password file: {exc.strerror}") from exc

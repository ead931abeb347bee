"""libvirt domain XML, compared with golden files (tests/golden/libvirt/*.xml), and the URI rules.

The XML is also checked against libvirt's own parser (the `test:///default` driver defines the
domain) when libvirt-python is installed: a golden file of XML libvirt rejects would be useless.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest

from bonneville.backends.base import VMConfig
from bonneville.backends.libvirt import uri as uris
from bonneville.backends.libvirt.backend import domain_name
from bonneville.backends.libvirt.hostnet import OUR_LINK, link_names
from bonneville.backends.libvirt.xml import METADATA_NS, DomainOptions, build_xml
from bonneville.guest.protocol import PORT_NAME, ROOT_TAG
from bonneville.spec.errors import BackendError
from tests.golden_files import BASE_VM, compare_golden, golden

BASE = BASE_VM
OPTIONS = DomainOptions(
    name="bonneville-c1-0123456789ab",
    uuid="01234567-89ab-cdef-0123-456789abcdef",
    agent_socket="/run/bonneville/lv/0123456789abcdef/agent.sock",
)

CASES: dict[str, tuple[VMConfig, DomainOptions]] = {
    "plain": (BASE, OPTIONS),
    "readonly": (replace(BASE, readonly_share=True), OPTIONS),
    "smp2_512m": (replace(BASE, vcpus=2, memory_mib=512), OPTIONS),
    "nic": (replace(BASE, nics=(("bvtap0", "02:42:ac:11:00:02"),)), OPTIONS),
    "two_nics": (
        replace(BASE, nics=(("bvtap0", "02:42:ac:11:00:02"), ("bvtap1", "02:42:ac:12:00:02"))),
        OPTIONS,
    ),
    "kvm": (BASE, replace(OPTIONS, accel="kvm")),
    "system": (
        replace(
            BASE,
            share_dir="/proc/4242/root/run/bonneville/c1/share",
            nics=(("bv01234567t0", "02:42:ac:11:00:02"),),
        ),
        replace(OPTIONS, dac_root=True),
    ),
    "minimal": (
        replace(BASE, initrd="", kernel_args=()),
        replace(OPTIONS, rng=False, vmgenid=False),
    ),
}


GOLDEN = {
    name: golden("libvirt", f"{name}.xml", partial(build_xml, *CASES[name])) for name in CASES
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str) -> None:
    compare_golden(GOLDEN[name])


@pytest.mark.parametrize("name", sorted(CASES))
def test_libvirt_accepts_the_xml(name: str) -> None:
    libvirt = pytest.importorskip("libvirt")
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    config, options = CASES[name]
    conn = libvirt.open("test:///default")
    try:
        # The test driver knows no "qemu" domain type; everything else is libvirt's real parser.
        text = build_xml(config, options).replace('type="qemu"', 'type="test"', 1)
        text = text.replace('type="kvm"', 'type="test"', 1)
        dom = conn.defineXML(text)
        try:
            assert dom.name() == options.name
            assert dom.UUIDString() == options.uuid
            assert dom.maxMemory() == config.memory_mib * 1024
        finally:
            dom.undefine()
    finally:
        conn.close()


def test_the_agent_and_the_share_use_the_guest_protocol_names() -> None:
    root = ET.fromstring(build_xml(BASE, OPTIONS))
    channel = root.find("devices/channel")
    assert channel is not None
    assert channel.find("target").get("name") == PORT_NAME  # type: ignore[union-attr]
    assert channel.find("source").get("path") == OPTIONS.agent_socket  # type: ignore[union-attr]
    fs = root.find("devices/filesystem")
    assert fs is not None and fs.get("accessmode") == "passthrough"
    assert fs.get("multidevs") == "remap"
    assert fs.find("target").get("dir") == ROOT_TAG  # type: ignore[union-attr]


def test_no_needless_devices() -> None:
    devices = ET.fromstring(build_xml(BASE, OPTIONS)).find("devices")
    assert devices is not None
    tags = sorted({d.tag for d in devices})
    assert tags == [
        "channel", "controller", "emulator", "filesystem", "memballoon", "rng", "serial",
    ]  # fmt: skip
    assert devices.find("memballoon").get("model") == "none"  # type: ignore[union-attr]
    usb = [c for c in devices.findall("controller") if c.get("type") == "usb"]
    assert [c.get("model") for c in usb] == ["none"]
    assert devices.find("graphics") is None and devices.find("video") is None


def test_domain_type_follows_the_accelerator() -> None:
    assert ET.fromstring(build_xml(BASE, OPTIONS)).get("type") == "qemu"
    assert ET.fromstring(build_xml(BASE, replace(OPTIONS, accel="kvm"))).get("type") == "kvm"
    with pytest.raises(ValueError):
        build_xml(BASE, replace(OPTIONS, accel="hvf"))


def test_metadata_names_the_container() -> None:
    root = ET.fromstring(build_xml(BASE, OPTIONS))
    entry = root.find(f"metadata/{{{METADATA_NS}}}container")
    assert entry is not None and entry.get("id") == "c1"
    assert entry.get("state") == BASE.run_dir


def test_special_characters_are_escaped() -> None:
    config = replace(BASE, share_dir="/tmp/a&b<c>/share", kernel_args=("x='1'", 'y="2"'))
    root = ET.fromstring(build_xml(config, OPTIONS))
    assert root.find("devices/filesystem/source").get("dir") == "/tmp/a&b<c>/share"  # type: ignore[union-attr]
    assert root.find("os/cmdline").text == "x='1' y=\"2\""  # type: ignore[union-attr]


def test_domain_names_are_unique_per_vm_and_bounded() -> None:
    a = domain_name("c1", "0" * 32)
    b = domain_name("c1", "1" * 32)
    assert a != b and a.startswith("bonneville-c1-")
    assert len(domain_name("x" * 64, "f" * 32)) <= 64


@pytest.mark.parametrize(
    ("uri", "embedded"),
    [
        ("qemu:///system", False),
        ("qemu+unix:///system", False),
        ("qemu:///embed", True),
        ("qemu:///embed?root=/run/x", True),
    ],
)
def test_uri_parse(uri: str, embedded: bool) -> None:
    assert uris.parse(uri).embedded is embedded


def test_embed_root_parent() -> None:
    target = uris.parse("qemu:///embed?root=/run/x")
    assert uris.embed_root(target, "0123456789abcdef") == "/run/x/0123456789abcdef"
    assert uris.embed_uri("/run/x/0123456789abcdef") == "qemu:///embed?root=/run/x/0123456789abcdef"
    default = uris.parse("qemu:///embed")
    assert default.embed_base == uris.DEFAULT_EMBED_BASE


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("xen:///system", "unsupported libvirt URI"),
        ("qemu+ssh://host/system", "remote host"),
        ("qemu:///session", "unsupported libvirt URI"),
        ("not a uri", "unsupported libvirt URI"),
        ("qemu:///embed?root=relative", "absolute path"),
        ("qemu:///embed?root=/" + "x" * 60, "too long"),
    ],
)
def test_bad_uris(uri: str, message: str) -> None:
    with pytest.raises(BackendError, match=message):
        uris.parse(uri)


def test_preflight_without_a_daemon(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-sock"
    with pytest.raises(BackendError, match="libvirtd is not running") as info:
        uris.preflight(f"qemu+unix:///system?socket={missing}")
    assert "\n" not in str(info.value)


def test_default_uri(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = {"BONNEVILLE_CONFIG": str(tmp_path / "config.toml")}
    assert uris.default_uri({**env, "BONNEVILLE_LIBVIRT_URI": "qemu:///embed"}) == uris.EMBED_URI
    monkeypatch.setattr(uris, "SYSTEM_SOCKETS", (str(tmp_path / "sock"),))
    assert uris.default_uri(env) == uris.EMBED_URI
    (tmp_path / "sock").touch()
    assert uris.default_uri(env) == uris.SYSTEM_URI
    # (settings caches each file it read: a new name for a file with contents)
    (tmp_path / "set.toml").write_text('[libvirt]\nuri = "qemu:///embed?root=/run/y"\n')
    env = {"BONNEVILLE_CONFIG": str(tmp_path / "set.toml")}
    assert uris.default_uri(env) == "qemu:///embed?root=/run/y"


def test_host_link_names_match_only_our_pattern() -> None:
    names = link_names("0123456789abcdef", 0)
    assert names == ("bv01234567c0", "bv01234567h0", "bv01234567t0")
    assert all(OUR_LINK.match(n) and len(n) <= 15 for n in names)
    for foreign in ("eth0", "bvtap0", "docker0", "bvtest0", "bv01234567x0"):
        assert not OUR_LINK.match(foreign)


def test_is_ours() -> None:
    assert uris.is_ours("/run/bonneville/lv/0123456789abcdef")
    assert not uris.is_ours("/run/bonneville/lv")
    assert not uris.is_ours("/")
    assert not uris.is_ours("relative/0123456789abcdef")

"""config.json loading and validation, the typed Spec, resources mapping and `bonneville spec`."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bonneville.spec import config as spec_config
from bonneville.spec.config import (
    Bundle,
    Hook,
    Mount,
    Process,
    Resources,
    load_bundle,
    load_process,
    open_bundle,
    parse_process,
)
from bonneville.spec.defaults import default_spec
from bonneville.spec.errors import BonnevilleError, ConfigError
from tests.golden_files import compare_golden, golden

MiB = 1024 * 1024
Mutation = Callable[[dict[str, Any]], None]


def make_bundle(tmp_path: Path, config: dict[str, Any] | str, rootfs: bool = True) -> Path:
    """A bundle whose rootfs is an empty directory: loading never looks inside it."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    if rootfs:
        (bundle / "rootfs").mkdir()
    text = config if isinstance(config, str) else json.dumps(config, indent=2)
    (bundle / "config.json").write_text(text)
    return bundle


def load_with(tmp_path: Path, mutate: Mutation) -> Bundle:
    config = default_spec()
    mutate(config)
    return load_bundle(str(make_bundle(tmp_path, config)))


def refused(tmp_path: Path, mutate: Mutation) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_with(tmp_path, mutate)
    return info.value


# --------------------------------------------------------------------------- valid bundles


def test_default_spec_loads(tmp_path: Path) -> None:
    config = default_spec()
    bundle = load_bundle(str(make_bundle(tmp_path, config)))
    assert bundle.path == str(tmp_path / "bundle")
    assert bundle.rootfs == str(tmp_path / "bundle" / "rootfs")
    assert bundle.raw == config
    assert bundle.config_path == str(tmp_path / "bundle" / "config.json")
    spec = bundle.spec
    assert spec.oci_version == "1.1.0"
    assert spec.root.path == "rootfs" and spec.root.readonly is True
    assert spec.hostname == "bonneville" and spec.domainname == ""
    assert spec.process is not None
    assert spec.process.args == ("sh",)
    assert spec.process.cwd == "/"
    assert spec.process.terminal is True
    assert spec.process.no_new_privileges is True
    assert spec.process.capabilities["bounding"] == (
        "CAP_AUDIT_WRITE",
        "CAP_KILL",
        "CAP_NET_BIND_SERVICE",
    )
    assert spec.process.capabilities["ambient"] == ()
    assert spec.process.rlimits[0].type == "RLIMIT_NOFILE"
    assert [m.destination for m in spec.mounts][:3] == ["/proc", "/dev", "/dev/pts"]
    assert [ns.type for ns in spec.linux.namespaces] == [
        "pid",
        "network",
        "ipc",
        "uts",
        "mount",
        "cgroup",
    ]
    assert spec.linux.namespace("network") is not None
    assert spec.linux.namespace("user") is None
    assert "/proc/kcore" in spec.linux.masked_paths
    assert "/proc/sys" in spec.linux.readonly_paths
    assert spec.hooks.prestart == () and spec.annotations == {}


def test_conftest_busybox_bundle_loads(bundle: Path) -> None:
    loaded = load_bundle(str(bundle))
    assert loaded.spec.process is not None
    assert loaded.spec.process.args == ("sh", "-c", "echo hello")
    assert loaded.spec.process.terminal is False
    assert os.path.isfile(os.path.join(loaded.rootfs, "bin", "busybox"))


def test_dataclasses_are_frozen(tmp_path: Path) -> None:
    bundle = load_with(tmp_path, lambda c: None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        bundle.spec.hostname = "x"  # type: ignore[misc]
    assert bundle.spec.process is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        bundle.spec.process.cwd = "/tmp"  # type: ignore[misc]


def test_relative_bundle_path_becomes_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_bundle(tmp_path, default_spec())
    monkeypatch.chdir(tmp_path)
    bundle = load_bundle("bundle")
    assert bundle.path == str(tmp_path / "bundle")
    assert bundle.rootfs == str(tmp_path / "bundle" / "rootfs")


def test_absolute_and_dotted_root_paths(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    bundle = load_with(tmp_path, lambda c: c["root"].__setitem__("path", str(elsewhere)))
    assert bundle.rootfs == str(elsewhere)
    config = default_spec()
    config["root"] = {"path": "./rootfs/"}
    (tmp_path / "bundle" / "config.json").write_text(json.dumps(config))  # same bundle dir
    loaded = load_bundle(str(tmp_path / "bundle"))
    assert loaded.rootfs == str(tmp_path / "bundle" / "rootfs")
    assert loaded.spec.root.readonly is False  # the spec's default


def test_symlinked_rootfs_is_not_resolved(tmp_path: Path) -> None:
    real = tmp_path / "real-rootfs"
    real.mkdir()
    bundle = make_bundle(tmp_path, default_spec(), rootfs=False)
    (bundle / "rootfs").symlink_to(real)
    assert load_bundle(str(bundle)).rootfs == str(bundle / "rootfs")


@pytest.mark.parametrize(
    "version", ["1.0.0", "1.0.2-dev", "1.1.0", "1.1.0-rc.1", "1.2.0", "1.9.9+x"]
)
def test_accepted_oci_versions(tmp_path: Path, version: str) -> None:
    bundle = load_with(tmp_path, lambda c: c.__setitem__("ociVersion", version))
    assert bundle.spec.oci_version == version


def test_process_may_be_absent(tmp_path: Path) -> None:
    bundle = load_with(tmp_path, lambda c: c.pop("process"))
    assert bundle.spec.process is None


def test_minimal_config(tmp_path: Path) -> None:
    config = {"ociVersion": "1.0.0", "root": {"path": "rootfs"}}
    spec = load_bundle(str(make_bundle(tmp_path, config))).spec
    assert spec.process is None
    assert spec.mounts == () and spec.linux.namespaces == ()
    assert spec.linux.resources == Resources()
    assert spec.hooks.poststop == ()


def test_unknown_properties_are_ignored(tmp_path: Path) -> None:
    def add_unknowns(c: dict[str, Any]) -> None:
        c["org.example.future"] = {"anything": [1, 2, 3]}
        c["process"]["futureField"] = True
        c["process"]["user"]["futureUserField"] = "x"
        c["process"]["capabilities"]["futureSet"] = ["CAP_KILL"]
        c["root"]["futureRootField"] = 1
        c["mounts"][0]["futureMountField"] = None
        c["hooks"] = {"prestart": [{"path": "/bin/true", "futureHookField": 1}], "futureHook": []}
        c["linux"]["futureLinuxField"] = {"a": "b"}
        c["linux"]["resources"]["futureController"] = {"x": 1}
        c["linux"]["namespaces"][0]["futureNsField"] = "y"
        c["windows"] = {"layerFolders": ["C:\\x"]}
        c["vm"] = {"hypervisor": {"path": "/usr/bin/qemu"}}

    bundle = load_with(tmp_path, add_unknowns)
    assert bundle.raw["org.example.future"] == {"anything": [1, 2, 3]}
    assert bundle.spec.hooks.prestart == (Hook(path="/bin/true"),)


def test_full_parse(tmp_path: Path) -> None:
    def fill(c: dict[str, Any]) -> None:
        p = c["process"]
        p["consoleSize"] = {"height": 24, "width": 80}
        p["user"] = {"uid": 1000, "gid": 1001, "umask": 0o22, "additionalGids": [5, 6]}
        p["oomScoreAdj"] = -500
        p["capabilities"]["ambient"] = ["CAP_KILL"]
        c["domainname"] = "example.org"
        c["annotations"] = {"org.example.key": "value"}
        c["mounts"].append(
            {"destination": "/data", "type": "none", "source": "/srv", "options": ["rbind", "ro"]}
        )
        c["mounts"].append({"destination": "/data2", "type": "bind", "source": "/srv"})
        c["hooks"] = {
            kind: [{"path": f"/hooks/{kind}", "args": [kind, "a"], "env": ["X=1"], "timeout": 5}]
            for kind in (
                "prestart",
                "createRuntime",
                "createContainer",
                "startContainer",
                "poststart",
                "poststop",
            )
        }
        linux = c["linux"]
        linux["namespaces"][1] = {"type": "network", "path": "/var/run/netns/x"}
        linux["resources"]["memory"] = {"limit": 512 * MiB, "swap": 1024 * MiB}
        linux["resources"]["cpu"] = {
            "quota": 150000,
            "period": 100000,
            "shares": 512,
            "cpus": "0-1",
        }
        linux["sysctl"] = {"net.ipv4.ip_forward": "1"}
        linux["devices"] = [{"type": "c", "path": "/dev/fuse", "major": 10, "minor": 229}]
        linux["uidMappings"] = [{"containerID": 0, "hostID": 1000, "size": 1}]
        linux["gidMappings"] = [{"containerID": 0, "hostID": 1000, "size": 1}]
        linux["cgroupsPath"] = "/bonneville/x"
        linux["seccomp"] = {"defaultAction": "SCMP_ACT_ERRNO"}

    spec = load_with(tmp_path, fill).spec
    p = spec.process
    assert p is not None
    assert p.console_size == (24, 80)
    assert p.user.uid == 1000 and p.user.gid == 1001
    assert p.user.umask == 0o22 and p.user.additional_gids == (5, 6)
    assert p.oom_score_adj == -500
    assert p.capabilities["ambient"] == ("CAP_KILL",)
    assert spec.domainname == "example.org"
    assert spec.annotations == {"org.example.key": "value"}
    data, data2 = spec.mounts[-2:]
    assert data == Mount("/data", "none", "/srv", ("rbind", "ro"))
    assert data.is_bind and data2.is_bind
    assert not spec.mounts[0].is_bind
    assert spec.hooks.create_runtime == (
        Hook("/hooks/createRuntime", ("createRuntime", "a"), ("X=1",), 5),
    )
    for field in dataclasses.fields(spec.hooks):
        assert len(getattr(spec.hooks, field.name)) == 1
    assert spec.linux.namespace("network") == spec_config.Namespace("network", "/var/run/netns/x")
    assert spec.linux.namespace("pid") == spec_config.Namespace("pid", "")
    res = spec.linux.resources
    assert res == Resources(
        memory_limit=512 * MiB, cpu_quota=150000, cpu_period=100000, cpu_shares=512, cpus="0-1"
    )
    assert spec.linux.sysctl == {"net.ipv4.ip_forward": "1"}
    assert spec.linux.devices[0]["path"] == "/dev/fuse"
    assert spec.linux.uid_mappings == ({"containerID": 0, "hostID": 1000, "size": 1},)
    assert spec.linux.gid_mappings[0]["hostID"] == 1000
    assert spec.linux.cgroups_path == "/bonneville/x"
    assert spec.linux.seccomp == {"defaultAction": "SCMP_ACT_ERRNO"}


def test_console_size_ignored_without_terminal(tmp_path: Path) -> None:
    def fill(c: dict[str, Any]) -> None:
        c["process"]["terminal"] = False
        c["process"]["consoleSize"] = {"height": 24, "width": 80}

    process = load_with(tmp_path, fill).spec.process
    assert process is not None and process.console_size is None


def test_defaults_when_process_fields_absent(tmp_path: Path) -> None:
    config = {
        "ociVersion": "1.0.0",
        "root": {"path": "rootfs"},
        "process": {"args": ["true"], "cwd": "/"},
    }
    process = load_bundle(str(make_bundle(tmp_path, config))).spec.process
    assert process == Process(args=("true",), cwd="/")
    assert process.user.uid == 0 and process.user.umask is None
    assert process.terminal is False and process.no_new_privileges is False
    assert process.oom_score_adj is None
    assert set(process.capabilities) == {
        "bounding",
        "effective",
        "inheritable",
        "permitted",
        "ambient",
    }


def test_validate_false_skips_schema(tmp_path: Path) -> None:
    config = default_spec()
    config["process"]["capabilities"]["bounding"] = ["NOT_A_CAP"]
    bundle = make_bundle(tmp_path, config)
    with pytest.raises(ConfigError):
        load_bundle(str(bundle))
    loaded = load_bundle(str(bundle), validate=False)
    assert loaded.spec.process is not None
    assert loaded.spec.process.capabilities["bounding"] == ("NOT_A_CAP",)


def test_validate_false_still_reports_broken_config(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, {"ociVersion": "1.0.0"})
    with pytest.raises(ConfigError, match="invalid config"):
        load_bundle(str(bundle), validate=False)


# --------------------------------------------------------------------------- refusals


def test_missing_bundle_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="bundle directory not found") as info:
        load_bundle(str(tmp_path / "nope"))
    assert info.value.path == str(tmp_path / "nope")
    assert isinstance(info.value, BonnevilleError)


def test_bundle_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="bundle is not a directory"):
        load_bundle(str(tmp_path / "file"))


def test_missing_config_json(tmp_path: Path) -> None:
    (tmp_path / "bundle").mkdir()
    with pytest.raises(ConfigError, match="no such file or directory") as info:
        load_bundle(str(tmp_path / "bundle"))
    assert info.value.path == str(tmp_path / "bundle" / "config.json")


def test_malformed_json_gives_line_and_column(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, '{\n  "ociVersion": "1.0.0",\n  "root": {"path": "rootfs",}\n}')
    with pytest.raises(ConfigError, match=r"malformed JSON at line 3 column \d+") as info:
        load_bundle(str(bundle))
    assert "\n" not in str(info.value)


def test_config_must_be_an_object(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must hold a JSON object, not an array"):
        load_bundle(str(make_bundle(tmp_path, "[1, 2]")))


def test_config_must_be_utf8(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, "{}")
    (bundle / "config.json").write_bytes(b'{"ociVersion": "\xff"}')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_bundle(str(bundle))


def test_oci_version_2_refused(tmp_path: Path) -> None:
    err = refused(tmp_path, lambda c: c.__setitem__("ociVersion", "2.0.0"))
    assert err.reason == 'unsupported ociVersion "2.0.0": bonneville supports 1.x'


@pytest.mark.parametrize("version", ["0.5.0", "10.0.0"])
def test_other_majors_refused(tmp_path: Path, version: str) -> None:
    err = refused(tmp_path, lambda c: c.__setitem__("ociVersion", version))
    assert "bonneville supports 1.x" in err.reason


@pytest.mark.parametrize("version", ["1", "1.0", "v1.0.0", "latest", "1.0.0.0"])
def test_non_semver_refused(tmp_path: Path, version: str) -> None:
    err = refused(tmp_path, lambda c: c.__setitem__("ociVersion", version))
    assert "is not a SemVer version" in err.reason


def test_rootfs_missing(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, default_spec(), rootfs=False)
    with pytest.raises(ConfigError, match=r"rootfs .*/bundle/rootfs not found"):
        load_bundle(str(bundle))


def test_rootfs_not_a_directory(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, default_spec(), rootfs=False)
    (bundle / "rootfs").write_text("")
    with pytest.raises(ConfigError, match="is not a directory"):
        load_bundle(str(bundle))


def _set(path: str, value: object) -> Mutation:
    """A mutation that sets a dotted path (list indices as numbers) in the config."""

    def mutate(c: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = c
        for part in parents:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        if last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


def _drop(path: str) -> Mutation:
    def mutate(c: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = c
        for part in parents:
            node = node[part]
        del node[last]

    return mutate


SCHEMA_REFUSALS: list[tuple[Mutation, str]] = [
    (_drop("ociVersion"), "ociVersion: required property is missing"),
    (_set("ociVersion", 1), "ociVersion: 1 is not of type 'string'"),
    (_drop("root"), "root: required property is missing"),
    (_drop("root.path"), "root.path: required property is missing"),
    (_set("root.readonly", "yes"), "root.readonly: 'yes' is not of type 'boolean'"),
    (_set("process.args", []), "process.args: [] should be non-empty"),
    (_drop("process.args"), "process.args: required property is missing"),
    (_set("process.args", ["sh", 1]), "process.args[1]: 1 is not of type 'string'"),
    (_drop("process.cwd"), "process.cwd: required property is missing"),
    (_set("process.terminal", "yes"), "process.terminal: 'yes' is not of type 'boolean'"),
    (_set("process.consoleSize", {"height": 1}), "process.consoleSize.width: required"),
    (_set("process.user.uid", -1), "process.user.uid: -1 is less than the minimum of 0"),
    (_set("process.user.gid", 2**32), "process.user.gid: 4294967296 is greater than"),
    (_drop("process.user.uid"), "process.user.uid: required property is missing"),
    (_set("process.user.additionalGids", ["5"]), "process.user.additionalGids[0]: '5' is not"),
    (_set("process.env", "PATH=/bin"), "process.env: 'PATH=/bin' is not of type 'array'"),
    (
        _set("process.capabilities.bounding", ["CAP_KILL", "kill"]),
        "process.capabilities.bounding[1]: 'kill' does not match",
    ),
    (
        _set("process.rlimits", [{"type": "NOFILE", "hard": 1, "soft": 1}]),
        "process.rlimits[0].type: 'NOFILE' does not match",
    ),
    (
        _set("process.rlimits", [{"type": "RLIMIT_NOFILE", "hard": -1, "soft": 1}]),
        "process.rlimits[0].hard: -1 is less than the minimum of 0",
    ),
    (
        _set("process.rlimits", [{"type": "RLIMIT_NOFILE", "soft": 1}]),
        "process.rlimits[0].hard: required property is missing",
    ),
    (_set("process.noNewPrivileges", 1), "process.noNewPrivileges: 1 is not of type 'boolean'"),
    (_set("process.oomScoreAdj", "5"), "process.oomScoreAdj: '5' is not of type 'integer'"),
    (_set("hostname", 5), "hostname: 5 is not of type 'string'"),
    (_set("mounts.0", {"type": "proc"}), "mounts[0].destination: required property is missing"),
    (_set("mounts.1.options", "ro"), "mounts[1].options: 'ro' is not of type 'array'"),
    (_set("hooks.prestart", [{"args": []}]), "hooks.prestart[0].path: required property"),
    (
        _set("hooks.poststop", [{"path": "/bin/true", "timeout": 0}]),
        "hooks.poststop[0].timeout: 0 is less than or equal to the minimum of 0",
    ),
    (_set("annotations", {"a": 1}), "annotations.a: 1 is not of type 'string'"),
    (_set("annotations", {"": "x"}), "annotations: '' should be non-empty"),
    (
        _set("linux.namespaces", [{"type": "netns"}]),
        "linux.namespaces[0].type: 'netns' is not one of",
    ),
    (
        _set("linux.resources.memory", {"limit": "1G"}),
        "linux.resources.memory.limit: '1G' is not of type 'integer'",
    ),
    (
        _set("linux.resources.cpu", {"period": -1}),
        "linux.resources.cpu.period: -1 is less than the minimum of 0",
    ),
    (_set("linux.resources.cpu", {"cpus": 2}), "linux.resources.cpu.cpus: 2 is not of type"),
    (_set("linux.maskedPaths", [1]), "linux.maskedPaths[0]: 1 is not of type 'string'"),
    (_set("linux.sysctl", {"a": 1}), "linux.sysctl.a: 1 is not of type 'string'"),
    (
        _set("linux.uidMappings", [{"containerID": 0, "hostID": 0}]),
        "linux.uidMappings[0].size: required property is missing",
    ),
    (
        _set("linux.devices", [{"type": "x", "path": "/dev/x"}]),
        "linux.devices[0].type: 'x' is not one of",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "fragment"), SCHEMA_REFUSALS, ids=[f for _m, f in SCHEMA_REFUSALS]
)
def test_schema_refusals(tmp_path: Path, mutate: Mutation, fragment: str) -> None:
    err = refused(tmp_path, mutate)
    assert fragment in err.reason
    assert err.path == str(tmp_path / "bundle" / "config.json")
    assert "\n" not in str(err)


SEMANTIC_REFUSALS: list[tuple[Mutation, str]] = [
    (_set("process.cwd", "tmp"), "process.cwd: 'tmp' must be an absolute path"),
    (_set("mounts.2.destination", "dev/pts"), "mounts[2].destination: 'dev/pts' must be an abs"),
    (
        _set("hooks.createRuntime", [{"path": "/bin/true"}, {"path": "true"}]),
        "hooks.createRuntime[1].path: 'true' must be an absolute path",
    ),
    (
        _set("linux.namespaces", [{"type": "pid"}, {"type": "pid"}]),
        "linux.namespaces[1]: duplicate namespace type 'pid'",
    ),
    (
        _set("linux.namespaces", [{"type": "network", "path": "run/netns/x"}]),
        "linux.namespaces[0].path: 'run/netns/x' must be an absolute path",
    ),
    (
        _set(
            "process.rlimits",
            [
                {"type": "RLIMIT_NOFILE", "hard": 1, "soft": 1},
                {"type": "RLIMIT_NOFILE", "hard": 2, "soft": 2},
            ],
        ),
        "process.rlimits[1]: duplicate rlimit 'RLIMIT_NOFILE'",
    ),
    (
        _set("process.rlimits", [{"type": "RLIMIT_BOGUS", "hard": 1, "soft": 1}]),
        "process.rlimits[0].type: unknown rlimit 'RLIMIT_BOGUS'",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "fragment"), SEMANTIC_REFUSALS, ids=[f for _m, f in SEMANTIC_REFUSALS]
)
def test_semantic_refusals(tmp_path: Path, mutate: Mutation, fragment: str) -> None:
    assert fragment in refused(tmp_path, mutate).reason


def test_version_checked_before_schema(tmp_path: Path) -> None:
    # A 2.x config may have any shape: say "unsupported version", not a schema complaint.
    def future(c: dict[str, Any]) -> None:
        c["ociVersion"] = "2.0.0"
        c["process"] = "something new"

    assert "unsupported ociVersion" in refused(tmp_path, future).reason


# --------------------------------------------------------------------------- resources


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        (None, 256),
        (-1, 256),
        (0, 256),
        (1, 128),
        (64 * MiB, 128),
        (128 * MiB, 128),
        (512 * MiB, 512),
        (512 * MiB + 1, 513),
        (6 * 1024 * MiB, 6144),
    ],
)
def test_memory_mib(limit: int | None, expected: int) -> None:
    assert Resources(memory_limit=limit).memory_mib() == expected


def test_memory_mib_custom_default_and_floor() -> None:
    assert Resources().memory_mib(default=1024) == 1024
    assert Resources(memory_limit=-1).memory_mib(default=64, floor=128) == 64
    assert Resources(memory_limit=10 * MiB).memory_mib(floor=32) == 32
    assert Resources(memory_limit=10 * MiB).memory_mib(floor=0) == 10


@pytest.mark.parametrize(
    ("quota", "period", "host", "expected"),
    [
        (None, None, 4, 1),  # no limit: one vCPU
        (-1, 100000, 4, 1),  # -1 is "no limit" in cgroup v1
        (0, 100000, 4, 1),
        (1000, 100000, 4, 1),  # a sliver of a CPU still needs one vCPU
        (100000, 100000, 4, 1),
        (150000, 100000, 4, 2),  # docker --cpus=1.5
        (200000, None, 4, 2),  # period defaults to the kernel's 100 ms
        (300000, 0, 4, 3),
        (800000, 100000, 4, 4),  # capped at the host's CPUs
        (800000, 100000, 0, 1),  # never below one
        (50000, 25000, 8, 2),
    ],
)
def test_vcpus(quota: int | None, period: int | None, host: int, expected: int) -> None:
    assert Resources(cpu_quota=quota, cpu_period=period).vcpus(host) == expected


def test_resources_from_docker_style_config(tmp_path: Path) -> None:
    def docker(c: dict[str, Any]) -> None:
        c["linux"]["resources"]["memory"] = {"limit": 300 * MiB}
        c["linux"]["resources"]["cpu"] = {"quota": 250000, "period": 100000}

    res = load_with(tmp_path, docker).spec.linux.resources
    assert res.memory_mib() == 300
    assert res.vcpus(host_cpus=2) == 2
    assert res.vcpus(host_cpus=8) == 3


# --------------------------------------------------------------------------- exec --process


def exec_process() -> dict[str, Any]:
    """What containerd writes for `exec --process`."""
    return {
        "terminal": False,
        "user": {"uid": 0, "gid": 0},
        "args": ["sh", "-c", "echo hi"],
        "env": ["PATH=/bin"],
        "cwd": "/",
        "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"]},
        "noNewPrivileges": True,
    }


def test_load_process(tmp_path: Path) -> None:
    path = tmp_path / "process.json"
    path.write_text(json.dumps(exec_process()))
    raw, process = load_process(str(path))
    assert raw == exec_process()
    assert process.args == ("sh", "-c", "echo hi")
    assert process.env == ("PATH=/bin",)
    assert process.capabilities["effective"] == ("CAP_KILL",)
    assert process.no_new_privileges is True


def test_load_process_errors(tmp_path: Path) -> None:
    path = tmp_path / "process.json"
    with pytest.raises(ConfigError, match="no such file or directory") as info:
        load_process(str(path))
    assert info.value.path == str(path)
    path.write_text("{oops")
    with pytest.raises(ConfigError, match="malformed JSON at line 1 column 2"):
        load_process(str(path))
    bad = exec_process()
    bad["args"] = []
    path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match=r"process\.args: \[\] should be non-empty"):
        load_process(str(path))
    bad = exec_process()
    bad["cwd"] = "relative"
    path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match=r"process\.cwd: 'relative' must be an absolute path"):
        load_process(str(path))
    path.write_text(json.dumps({"process": exec_process()}))  # a whole config is not a process
    with pytest.raises(ConfigError, match=r"process\.(cwd|args): required property is missing"):
        load_process(str(path))


def test_parse_process_validates_by_itself() -> None:
    process = parse_process(exec_process(), "where.json")
    assert process.args == ("sh", "-c", "echo hi")
    broken = copy.deepcopy(exec_process())
    broken["user"] = {"uid": "root", "gid": 0}
    with pytest.raises(ConfigError, match=r"process\.user\.uid: 'root' is not of type") as info:
        parse_process(broken, "where.json")
    assert info.value.path == "where.json"


def test_a_process_no_execve_takes_is_refused_naming_the_field() -> None:
    """Over 6 MiB of argv and environment (strings, NULs, pointers) no kernel runs; below it,
    execve decides at start, as under runc."""
    mib = "x" * (1 << 20)
    big = exec_process()
    big["env"] = [f"V{i}={mib}" for i in range(7)]
    with pytest.raises(ConfigError, match=r"process\.env is 7\.0 MiB; the kernel accepts at most"):
        parse_process(big, "where.json")
    big["env"] = [f"V{i}={mib}" for i in range(3)]
    big["args"] = ["sh", *[mib] * 4]
    with pytest.raises(ConfigError, match=r"process\.args and process\.env are 7\.0 MiB together"):
        parse_process(big, "where.json")
    big["args"] = ["sh"]
    big["env"] = [f"SAME={mib}"] * 7  # the environment has the last of each name
    parse_process(big, "where.json")
    big["env"] = [f"V{i}={mib}" for i in range(5)]
    parse_process(big, "where.json")


# --------------------------------------------------------------------------- lazy import, cache


def test_jsonschema_imported_only_when_validating(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, default_spec())
    script = f"""
import sys
import bonneville.spec.config, bonneville.spec.defaults
import bonneville.spec.errors
assert "jsonschema" not in sys.modules, "imported at module level"
bonneville.spec.config.load_bundle({str(bundle)!r}, validate=False)
assert "jsonschema" not in sys.modules, "imported without validation"
bonneville.spec.config.load_bundle({str(bundle)!r})
assert "jsonschema" in sys.modules
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_validators_are_cached() -> None:
    assert spec_config._validator("config") is spec_config._validator("config")
    assert spec_config._validator("process") is spec_config._validator("process")
    assert spec_config._validator("config") is not spec_config._validator("process")


def test_schema_file_is_a_valid_json_schema() -> None:
    from jsonschema import Draft202012Validator

    schema = json.loads(Path(spec_config.SCHEMA_PATH).read_text())
    Draft202012Validator.check_schema(schema)
    # The spec says unknown properties MUST be ignored: nothing may close an object.
    assert '"additionalProperties": false' not in Path(spec_config.SCHEMA_PATH).read_text()


# --------------------------------------------------------------------------- `bonneville spec`


DEFAULT_SPEC = golden(
    "spec", "default_spec.json", lambda: json.dumps(default_spec(), indent=2) + "\n"
)


def test_default_spec_golden() -> None:
    compare_golden(DEFAULT_SPEC)


def test_default_spec_matches_runc_example() -> None:
    spec = default_spec()
    process = spec["process"]
    assert spec["ociVersion"] == "1.1.0"
    assert process["terminal"] is True and process["args"] == ["sh"]
    assert process["env"] == [
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "TERM=xterm",
    ]
    assert process["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]
    assert spec["root"] == {"path": "rootfs", "readonly": True}
    assert spec["hostname"] == "bonneville"
    assert [(m["destination"], m["type"]) for m in spec["mounts"]] == [
        ("/proc", "proc"),
        ("/dev", "tmpfs"),
        ("/dev/pts", "devpts"),
        ("/dev/shm", "tmpfs"),
        ("/dev/mqueue", "mqueue"),
        ("/sys", "sysfs"),
        ("/sys/fs/cgroup", "cgroup"),
    ]
    assert "options" not in spec["mounts"][0]  # runc omits /proc's options
    assert spec["linux"]["resources"] == {"devices": [{"allow": False, "access": "rwm"}]}


def test_default_spec_is_fresh_each_call() -> None:
    first = default_spec()
    first["process"]["args"].append("x")
    first["process"]["capabilities"]["bounding"].clear()
    second = default_spec()
    assert second["process"]["args"] == ["sh"]
    assert len(second["process"]["capabilities"]["bounding"]) == 3


def test_rootless_spec(tmp_path: Path) -> None:
    spec = default_spec(rootless=True)
    linux = spec["linux"]
    types = [ns["type"] for ns in linux["namespaces"]]
    assert "network" not in types
    assert types.count("user") == 1 and types[-1] == "user"
    assert linux["uidMappings"] == [{"containerID": 0, "hostID": os.geteuid(), "size": 1}]
    assert linux["gidMappings"] == [{"containerID": 0, "hostID": os.getegid(), "size": 1}]
    assert "resources" not in linux
    sys_mount = next(m for m in spec["mounts"] if m["destination"] == "/sys")
    assert sys_mount == {
        "destination": "/sys",
        "type": "none",
        "source": "/sys",
        "options": ["rbind", "nosuid", "noexec", "nodev", "ro"],
    }
    for mount in spec["mounts"]:
        assert not any(o.startswith(("uid=", "gid=")) for o in mount.get("options", []))
    pts = next(m for m in spec["mounts"] if m["destination"] == "/dev/pts")
    assert "ptmxmode=0666" in pts["options"]
    assert spec["mounts"][0] == {"destination": "/proc", "type": "proc", "source": "proc"}
    loaded = load_bundle(str(make_bundle(tmp_path, spec)))
    assert loaded.spec.linux.namespace("user") is not None
    assert loaded.spec.linux.resources == Resources()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c["process"].pop("cwd"),
        lambda c: c["mounts"].append({"destination": 7}),
        lambda c: c.update(ociVersion="0.1.0"),
    ],
)
def test_validation_in_a_child_refuses_as_in_process_validation(
    tmp_path: Path, mutate: Mutation
) -> None:
    """create validates in a child while it goes on (open_bundle): the same verdicts, on
    result(), or at once when the parser fails too; the child is reaped either way."""
    config = default_spec()
    mutate(config)
    bundle = str(make_bundle(tmp_path, config))
    with pytest.raises(ConfigError) as here:
        load_bundle(bundle)
    with pytest.raises(ConfigError) as pending:
        _, validation = open_bundle(bundle)
        validation.result()
    assert str(pending.value) == str(here.value)
    assert our_children() == []
    (tmp_path / "ok").mkdir()
    ok, validation = open_bundle(str(make_bundle(tmp_path / "ok", default_spec())))
    validation.result()
    assert ok.spec and our_children() == []


def test_an_abandoned_validation_leaves_no_child(tmp_path: Path) -> None:
    _, validation = open_bundle(str(make_bundle(tmp_path, default_spec())))
    validation.abandon()
    validation.result()  # nothing to wait for any more
    assert our_children() == []


def our_children() -> list[int]:
    """This process's children, running or not yet reaped."""
    with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
        return [int(pid) for pid in f.read().split()]


def test_an_odd_key_in_the_error_path_is_quoted_and_the_error_stays_one_line(
    tmp_path: Path,
) -> None:
    """Found by tests/test_fuzz.py: a sysctl named "\\n" made a two-line error."""
    error = refused(tmp_path, lambda c: c["linux"].update(sysctl={"\n": None}))
    assert str(error).endswith("linux.sysctl[\"\\n\"]: None is not of type 'string'")
    assert "\n" not in str(error)

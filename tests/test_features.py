"""The features document (`bonneville features`): shape per features.md, and honest claims."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from bonneville.shim.features import features
from bonneville.spec.config import load_bundle
from bonneville.spec.defaults import default_spec


@pytest.fixture
def doc() -> dict[str, Any]:
    return features()


def test_top_level_keys(doc: dict[str, Any]) -> None:
    assert set(doc) == {
        "ociVersionMin",
        "ociVersionMax",
        "hooks",
        "mountOptions",
        "linux",
        "annotations",
    }
    assert set(doc["linux"]) == {
        "namespaces",
        "capabilities",
        "cgroup",
        "seccomp",
        "apparmor",
        "selinux",
        "intelRdt",
    }


def test_versions(doc: dict[str, Any]) -> None:
    assert doc["ociVersionMin"] == "1.0.0"
    assert doc["ociVersionMax"] == "1.1.0"
    # MUST NOT hold properties newer than ociVersionMax: mountExtensions is a 1.2.0 property.
    assert "mountExtensions" not in doc and "mountExtensions" not in doc["linux"]


@pytest.mark.parametrize("key", ["ociVersionMin", "ociVersionMax"])
def test_advertised_versions_are_accepted(tmp_path: Path, doc: dict[str, Any], key: str) -> None:
    # features.md: the runtime MUST accept both values as config.json's ociVersion.
    (tmp_path / "rootfs").mkdir()
    config = default_spec()
    config["ociVersion"] = doc[key]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_bundle(str(tmp_path)).spec.oci_version == doc[key]


def test_seccomp_is_applied_and_the_other_security_features_are_not(
    doc: dict[str, Any],
) -> None:
    from bonneville.guest.syscallfilter import ACTIONS, ARCHES, OPERATORS

    linux = doc["linux"]
    seccomp = linux["seccomp"]
    assert seccomp["enabled"] is True
    # Exactly what the agent compiles.
    assert set(seccomp["actions"]) == set(ACTIONS)
    assert set(seccomp["operators"]) == set(OPERATORS)
    assert set(seccomp["archs"]) <= set(ARCHES)
    assert linux["apparmor"] == {"enabled": False}
    assert linux["selinux"] == {"enabled": False}
    assert linux["intelRdt"] == {"enabled": False}
    # The host cgroup (shim/cgroups/): runc's managers' placement, not the user-scoped one.
    assert linux["cgroup"] == {
        "v1": True,
        "v2": True,
        "systemd": True,
        "systemdUser": False,
        "rdma": False,
    }


def test_all_hooks(doc: dict[str, Any]) -> None:
    assert doc["hooks"] == [
        "prestart",
        "createRuntime",
        "createContainer",
        "startContainer",
        "poststart",
        "poststop",
    ]


def test_namespaces(doc: dict[str, Any]) -> None:
    assert set(doc["linux"]["namespaces"]) == {
        "cgroup",
        "ipc",
        "mount",
        "network",
        "pid",
        "time",
        "user",
        "uts",
    }
    for ns in (
        default_spec()["linux"]["namespaces"] + default_spec(rootless=True)["linux"]["namespaces"]
    ):
        assert ns["type"] in doc["linux"]["namespaces"]


def test_capabilities(doc: dict[str, Any]) -> None:
    caps = doc["linux"]["capabilities"]
    assert len(caps) == len(set(caps)) == 41  # CAP_CHOWN (0) … CAP_CHECKPOINT_RESTORE (40)
    assert caps[0] == "CAP_CHOWN" and caps[-1] == "CAP_CHECKPOINT_RESTORE"
    assert all(re.fullmatch(r"CAP_[A-Z_]+", cap) for cap in caps)
    assert {"CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_BPF", "CAP_PERFMON"} <= set(caps)
    for caps_set in default_spec()["process"]["capabilities"].values():
        assert set(caps_set) <= set(caps)


def test_mount_options(doc: dict[str, Any]) -> None:
    options = doc["mountOptions"]
    assert len(options) == len(set(options))
    assert {"bind", "rbind", "ro", "rw", "nosuid", "nodev", "noexec", "rprivate"} <= set(options)
    assert "tmpcopyup" not in options  # not implemented by the agent
    # Filesystem-specific data options must not be listed (features.md, Linux).
    assert not any("=" in option for option in options)


def test_annotations(doc: dict[str, Any]) -> None:
    annotations = doc["annotations"]
    assert all(isinstance(k, str) and k and isinstance(v, str) for k, v in annotations.items())
    assert annotations["io.github.bonneville.backends"] == "qemu"
    assert annotations["io.github.bonneville.isolation"] == "vm"
    assert annotations["io.github.bonneville.version"]


def test_json_serialisable_and_fresh(doc: dict[str, Any]) -> None:
    assert json.loads(json.dumps(doc)) == doc
    doc["hooks"].clear()
    doc["linux"]["apparmor"]["enabled"] = True
    again = features()
    assert len(again["hooks"]) == 6
    assert again["linux"]["apparmor"]["enabled"] is False

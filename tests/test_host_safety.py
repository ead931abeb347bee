"""Host safety with the fake backend: a container's config and rootfs cannot make the runtime
touch the host outside the container. QEMU's own confinement: integration/test_host_safety.py.

The monitor builds the shared directory in a private mount namespace, so its mounts are read
from /proc/<monitor>/mountinfo: a mount over the host's /etc would show there first.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.support import Runtime, default_config, write_bundle


def _mounts(pid: int) -> dict[str, set[str]]:
    """Mount point → its per-mount options, in ``pid``'s mount namespace."""
    result: dict[str, set[str]] = {}
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            fields = line.split()
            result[fields[4]] = set(fields[5].split(","))
    return result


def _bind(source: Path, destination: str, *options: str) -> dict[str, object]:
    return {
        "destination": destination,
        "type": "bind",
        "source": str(source),
        "options": ["rbind", *options],
    }


def _create(runtime: Runtime, bundle: Path) -> tuple[str, int]:
    cid = f"safety-{uuid.uuid4().hex[:10]}"
    runtime("create", "--bundle", str(bundle), cid, check=True)
    return cid, int(runtime.state(cid)["pid"])  # type: ignore[call-overload]


@pytest.mark.parametrize("link", ["/etc", "../../../../../../etc", "/../etc", "etc"])
def test_bind_destination_symlinked_out_of_the_root_stays_inside(
    runtime: Runtime, tmp_path: Path, link: str
) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "marker").write_text("volume\n")
    config = default_config(["sleep", "1000"])
    config["mounts"] = [*config["mounts"], _bind(volume, "/data")]  # type: ignore[misc]
    bundle = write_bundle(tmp_path / "bundle", config)
    (bundle / "rootfs" / "data").symlink_to(link)
    cid, monitor = _create(runtime, bundle)
    mounts = _mounts(monitor)
    assert "/etc" not in mounts, "the host's /etc was mounted over"
    # The host resolves no path inside the rootfs: the agent binds the volume, inside the
    # container's own root (its /etc), where the symlink can lead nowhere else.
    runtime("start", cid, check=True)
    seen = runtime("exec", cid, "cat", "/etc/marker", check=True).stdout
    assert seen == b"volume\n"
    assert "/etc" not in _mounts(monitor) and "/etc" not in _mounts(os.getpid())
    assert not os.path.exists("/etc/marker")
    runtime("delete", "--force", cid, check=True)


@pytest.mark.parametrize(
    ("destination", "why"),
    [("/../../etc", "'..'"), ("/data/../../etc", "'..'"), ("../x", "absolute")],
)
def test_dotdot_in_a_mount_destination_is_refused(
    runtime: Runtime, tmp_path: Path, destination: str, why: str
) -> None:
    config = default_config(["true"])
    config["mounts"] = [_bind(tmp_path, destination)]
    bundle = write_bundle(tmp_path / "bundle", config)
    result = runtime("create", "--bundle", str(bundle), "c1")
    assert result.returncode == 1
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and why in lines[0], lines
    assert not (runtime.root / "c1").exists()


def test_missing_bind_source_is_refused(runtime: Runtime, tmp_path: Path) -> None:
    config = default_config(["true"])
    config["mounts"] = [_bind(tmp_path / "nonesuch", "/data")]
    bundle = write_bundle(tmp_path / "bundle", config)
    result = runtime("create", "--bundle", str(bundle), "c1")
    assert result.returncode == 1
    assert b"does not exist" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (runtime.root / "c1").exists()


def test_share_is_nosuid_nodev_and_ro_volumes_are_read_only_on_the_host(
    runtime: Runtime, tmp_path: Path
) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    rw = tmp_path / "rw"
    rw.mkdir()
    config = default_config(["sleep", "1000"])
    config["mounts"] = [
        *config["mounts"],  # type: ignore[misc]
        _bind(ro, "/ro", "ro"),
        _bind(rw, "/rw"),
    ]
    cid, monitor = _create(runtime, write_bundle(tmp_path / "bundle", config))
    export = str(runtime.root / cid / "share")
    tree = f"{export}/{cid}"
    mounts = _mounts(monitor)
    assert {"nosuid", "nodev", "noexec"} <= mounts[export]
    assert {"nosuid", "nodev"} <= mounts[f"{tree}/root"]
    # Each volume under its own name in binds/ (its index in the config's mounts).
    index = len(config["mounts"]) - 2  # type: ignore[arg-type]
    ro_at, rw_at = f"{tree}/binds/{index}/ro", f"{tree}/binds/{index + 1}/rw"
    assert {"ro", "nosuid", "nodev"} <= mounts[ro_at]
    assert "rw" in mounts[rw_at] and "nosuid" in mounts[rw_at]

    def touch(path: str) -> subprocess.CompletedProcess[bytes]:
        # As QEMU would write it: from the monitor's mount namespace, as root.
        return subprocess.run(
            ["nsenter", "-t", str(monitor), "-m", "touch", path], capture_output=True, check=False
        )

    refused = touch(f"{ro_at}/x")
    assert refused.returncode != 0 and b"Read-only file system" in refused.stderr
    assert not (ro / "x").exists()
    assert touch(f"{rw_at}/x").returncode == 0 and (rw / "x").exists()
    runtime("delete", "--force", cid, check=True)


def test_mounts_vanish_with_the_monitor(runtime: Runtime, tmp_path: Path) -> None:
    """Nothing of a container is mounted in the host's own namespace, before or after."""
    config = default_config(["sleep", "1000"])
    config["mounts"] = [*config["mounts"], _bind(tmp_path, "/data")]  # type: ignore[misc]
    cid, _ = _create(runtime, write_bundle(tmp_path / "bundle", config))
    assert not any(m.startswith(str(runtime.root)) for m in _mounts(os.getpid()))
    runtime("delete", "--force", cid, check=True)
    assert not any(m.startswith(str(runtime.root)) for m in _mounts(os.getpid()))

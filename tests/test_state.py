"""The state store, status machine, signal parsing and path resolution: pure host logic."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bonneville.backends import procfs
from bonneville.backends.atomicfile import atomic_write
from bonneville.shim.ids import validate_id
from bonneville.shim.signals import parse_signal
from bonneville.shim.state import ContainerState, Store
from bonneville.shim.status import Status
from bonneville.spec.errors import BonnevilleError, ContainerExists, ContainerNotFound


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "../x", "-x", "a b", "x" * 1025, "é"])
def test_invalid_ids_are_refused(bad: str) -> None:
    with pytest.raises(BonnevilleError, match="invalid container id"):
        validate_id(bad)


@pytest.mark.parametrize("good", ["a", "abc-123", "A.b_c+d", "0" * 64])
def test_valid_ids(good: str) -> None:
    assert validate_id(good) == good


def test_duplicate_id_is_refused_by_mkdir(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "root"))
    store.create_dir("c1")
    with pytest.raises(ContainerExists, match="container with id exists: c1"):
        store.create_dir("c1")


def test_save_load_roundtrip_and_unknown_keys(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    store.create_dir("c1")
    st = ContainerState(id="c1", bundle="/b", rootfs="/b/rootfs", backend="fake", pid=42)
    store.save(st)
    loaded = store.load("c1")
    assert loaded == st
    # A newer version's extra keys must not break an older reader.
    text = (tmp_path / "c1" / "state.json").read_text().replace('"pid"', '"future": 1, "pid"')
    (tmp_path / "c1" / "state.json").write_text(text)
    assert store.load("c1").pid == 42


def test_load_unknown_and_damaged(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    with pytest.raises(ContainerNotFound, match="container nope does not exist"):
        store.load("nope")
    store.create_dir("bad")
    (tmp_path / "bad" / "state.json").write_text("{not json")
    with pytest.raises(BonnevilleError, match="damaged state file"):
        store.load("bad")


def test_lock_of_missing_container(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    with pytest.raises(ContainerNotFound), store.lock("ghost"):
        pass


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "f"
    atomic_write(str(target), b"123")
    atomic_write(str(target), b"4567")
    assert target.read_bytes() == b"4567"
    assert os.listdir(tmp_path) == ["f"]


def test_ids_lists_only_container_directories(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    store.create_dir("b")
    store.create_dir("a")
    (tmp_path / "stray-file").write_text("")
    assert store.ids() == ["a", "b"]


def test_status_questions() -> None:
    assert Status.CREATED.can_start and not Status.RUNNING.can_start
    assert Status.RUNNING.can_kill and Status.CREATED.can_kill and not Status.STOPPED.can_kill
    assert Status.STOPPED.can_delete and Status.CREATED.can_delete
    assert not Status.RUNNING.can_delete
    assert Status.RUNNING.can_pause and Status.PAUSED.can_resume and not Status.CREATED.can_pause


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("9", 9),
        ("KILL", 9),
        ("SIGKILL", 9),
        ("sigterm", 15),
        ("TERM", 15),
        ("USR1", 10),
        ("RTMIN+1", signal.SIGRTMIN + 1),
        ("0", 0),  # runc: `kill ID 0` only checks that the container can be signalled
    ],
)
def test_parse_signal(text: str, number: int) -> None:
    assert parse_signal(text) == number


@pytest.mark.parametrize("bad", ["999", "NOPE", "SIG", "", "-1"])
def test_parse_signal_rejects(bad: str) -> None:
    with pytest.raises(BonnevilleError, match="invalid signal"):
        parse_signal(bad)


def test_procfs_start_time_detects_pid_reuse() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        start = procfs.start_time(proc.pid)
        assert start is not None
        assert procfs.is_alive(proc.pid, start)
        assert not procfs.is_alive(proc.pid, start + 1)
    finally:
        proc.kill()
        proc.wait()
    assert not procfs.is_alive(proc.pid, start)

"""Fixtures shared by tests/ (unit, fake backend) and integration/ (real VMs and daemons), and the
session's set-up: this checkout's `bonneville` first on PATH, skips made failures on request.
The helpers behind them are in tests/support.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    CHECKOUT,
    LINKS_AT_START,
    Runtime,
    default_config,
    leftover_processes,
    make_busybox_rootfs,
    use_checkout_launcher,
    write_bundle,
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fail-on-skip",
        action="store_true",
        help="a skipped test fails, unless marked may_skip (test.sh: everything install.sh "
        "installs is there, so a skip means a test that did not run)",
    )


def pytest_configure(config: pytest.Config) -> None:
    # Before any fixture or test module: every CLI call, dockerd's and containerd's runtime
    # path and the Pythons the tests start get this checkout's code, not the installed one's.
    use_checkout_launcher()


def pytest_report_header() -> list[str]:
    lines = [f"bonneville: {use_checkout_launcher()} (the checkout {CHECKOUT})"]
    if LINKS_AT_START:
        left = " ".join(sorted(LINKS_AT_START))
        lines.append(f"host links left by an earlier run (ignored): {left}")
    return lines


def _no_skip_allowed(config: pytest.Config, item: pytest.Item | None = None) -> bool:
    if not config.getoption("fail_on_skip"):
        return False
    return item is None or item.get_closest_marker("may_skip") is None


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # (path, line, "Skipped: reason")
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and not hasattr(report, "wasxfail") and _no_skip_allowed(item.config, item):
        report.outcome = "failed"
        reason = _skip_reason(report)
        report.longrepr = f"skipped where no skip is allowed (--fail-on-skip): {reason}"


# Modules skipped whole while collected (importorskip, a module-level skip): made failures at
# the end of the session (a failed collection would stop the run before any test).
_skipped_modules: list[str] = []


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped:
        _skipped_modules.append(f"{report.nodeid}: {_skip_reason(report)}")


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if _skipped_modules and _no_skip_allowed(config):
        terminalreporter.section("skipped where no skip is allowed (--fail-on-skip)", red=True)
        for line in _skipped_modules:
            terminalreporter.line(line)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped_modules and _no_skip_allowed(session.config) and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def busybox_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-mostly busybox rootfs shared by tests that do not write into it."""
    return make_busybox_rootfs(tmp_path_factory.mktemp("busybox") / "rootfs")


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """A fresh bundle with its own writable busybox rootfs and `sh -c 'echo hello'`."""
    return write_bundle(tmp_path / "bundle", default_config(["sh", "-c", "echo hello"]))


@pytest.fixture
def backend_name() -> str:
    """The backend `runtime` runs: the fake one here; integration/ overrides it (QEMU, or a
    parameter over the real backends)."""
    return "fake"


@pytest.fixture
def runtime(tmp_path: Path, backend_name: str) -> Iterator[Runtime]:
    """The CLI with a --root of the test's own on ``backend_name``; every container of the test
    is deleted afterwards, and none of its monitors or VMs may outlive that."""
    rt = Runtime(tmp_path / "state", backend_name)
    yield rt
    rt.cleanup()
    assert leftover_processes(str(rt.root)) == []

"""The golden files and their cases (tests/golden_files.py) stay in step: regeneration writes
exactly the files the tests compare."""

from __future__ import annotations

from tests.golden_files import GOLDEN_DIR, load_cases, unclaimed_files


def test_every_golden_file_is_made_by_a_case() -> None:
    assert unclaimed_files() == []


def test_every_case_has_its_file() -> None:
    assert [key for key in load_cases() if not (GOLDEN_DIR / key).is_file()] == []

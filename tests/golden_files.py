"""Golden files: expected outputs under tests/golden/<kind>/<name>, compared byte for byte.

Each case is registered with the function that makes its text (:func:`golden`); tests compare
it with the file (:func:`compare_golden`) and never write one. Only the separate command

    ./test.sh --regen-golden        (that is: python -m tests.golden_files)

rewrites the files from the code, and says which changed; review that diff before committing.
``BASE_VM`` is the VM configuration the backends' golden cases start from.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path

from bonneville.backends.base import VMConfig

GOLDEN_DIR = Path(__file__).parent / "golden"

# The test modules whose import registers golden cases (regeneration imports them all).
MODULES = (
    "tests.test_qemu_cmdline",
    "tests.test_libvirt_xml",
    "tests.test_spec",
    "tests.test_vsphere",
)

# "<kind>/<name>" (the file under GOLDEN_DIR) -> what makes its text.
CASES: dict[str, Callable[[], str]] = {}

BASE_VM = VMConfig(
    container_id="c1",
    memory_mib=256,
    vcpus=1,
    share_dir="/run/bonneville/c1/share",
    run_dir="/run/bonneville/c1",
    kernel="/var/lib/bonneville/image/vmlinux",
    initrd="/var/lib/bonneville/image/initrd.img",
    kernel_args=("console=ttyS0", "quiet", "panic=-1"),
)


def golden(kind: str, name: str, make: Callable[[], str]) -> str:
    """Register the case tests/golden/<kind>/<name>, made by ``make``; its key."""
    key = f"{kind}/{name}"
    if key in CASES:
        raise ValueError(f"two golden cases write tests/golden/{key}")
    CASES[key] = make
    return key


def compare_golden(key: str) -> None:
    """The registered case ``key`` must make exactly the text of its file."""
    path = GOLDEN_DIR / key
    assert CASES[key]() == path.read_text(), (
        f"{path} differs from what the code makes; `./test.sh --regen-golden` rewrites it "
        "(review the diff)"
    )


def load_cases() -> dict[str, Callable[[], str]]:
    """Every registered case (importing :data:`MODULES`)."""
    for module in MODULES:
        importlib.import_module(module)
    return CASES


def unclaimed_files() -> list[str]:
    """Files under tests/golden/ that no case makes."""
    cases = load_cases()
    files = (str(p.relative_to(GOLDEN_DIR)) for p in GOLDEN_DIR.rglob("*") if p.is_file())
    return sorted(f for f in files if f not in cases)


def regenerate() -> list[str]:
    """Rewrite every golden file from the code; the keys of those whose text changed."""
    changed = []
    for key, make in sorted(load_cases().items()):
        path = GOLDEN_DIR / key
        text = make()
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            changed.append(key)
    return changed


def main() -> int:
    changed = regenerate()
    for key in changed:
        print(f"rewritten: tests/golden/{key}")
    for key in unclaimed_files():
        print(f"no case makes tests/golden/{key}: remove it if that is right")
    print(f"{len(CASES)} golden files, {len(changed)} rewritten; review `git diff tests/golden`")
    return 0


if __name__ == "__main__":
    # The test modules register their cases with tests.golden_files, not with this __main__.
    from tests.golden_files import main as main_of_the_module

    sys.exit(main_of_the_module())

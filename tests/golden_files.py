"""Golden files: expected outputs under tests/golden/<kind>/, compared byte for byte.

Set BONNEVILLE_REGEN_GOLDEN=1 to rewrite them from the code instead of comparing; review the diff
before committing. ``BASE_VM`` is the VM configuration the backends' golden cases start from.
"""

from __future__ import annotations

import os
from pathlib import Path

from bonneville.backends.base import VMConfig

GOLDEN_DIR = Path(__file__).parent / "golden"
REGEN = os.environ.get("BONNEVILLE_REGEN_GOLDEN") == "1"

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


def compare_golden(kind: str, name: str, text: str) -> None:
    """``text`` must equal tests/golden/<kind>/<name> (or becomes it, with REGEN)."""
    path = GOLDEN_DIR / kind / name
    if REGEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs; BONNEVILLE_REGEN_GOLDEN=1 to regenerate"

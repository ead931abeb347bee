"""The vSphere container's root disk: the ext4 disk labelled LABEL, its UUID the token the
agent proves itself with (backends/vsphere/media.py makes it). Standard library only: this
module goes into the guest image."""

from __future__ import annotations

import os
import struct

LABEL = "bonneville-root"
EXT4_SUPER_OFFSET = 1024
EXT4_MAGIC = 0xEF53


def ext4_identity(head: bytes) -> tuple[str, str] | None:
    """(label, UUID) of an ext4 superblock at the start of a device, or None."""
    sb = head[EXT4_SUPER_OFFSET : EXT4_SUPER_OFFSET + 136]
    if len(sb) < 136 or struct.unpack_from("<H", sb, 56)[0] != EXT4_MAGIC:
        return None
    raw = sb[104:120].hex()
    uuid = f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}"
    return sb[120:136].split(b"\0", 1)[0].decode(errors="replace"), uuid


def root_disk_now(block: str = "/sys/class/block", devices: str = "/dev") -> tuple[str, str] | None:
    """(device, UUID) of the disk labelled LABEL among the block devices there are now."""
    for name in sorted(os.listdir(block)):
        device = f"{devices}/{name}"
        try:
            with open(device, "rb") as f:
                identity = ext4_identity(f.read(4096))
        except OSError:
            continue
        if identity is not None and identity[0] == LABEL:
            return device, identity[1]
    return None

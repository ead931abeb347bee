"""The initramfs as an in-memory file tree, written out as a newc cpio archive (and read back)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from bonneville.backends.image.common import ImageError, read_file

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import BinaryIO


@dataclass
class _Node:
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


@dataclass
class Tree:
    """An in-memory file tree, written out as a newc cpio archive."""

    nodes: dict[str, _Node] = field(default_factory=dict)

    @staticmethod
    def _clean(path: str) -> str:
        clean = os.path.normpath("/" + path).lstrip("/")
        if not clean or clean == ".":
            raise ValueError(f"bad archive path {path!r}")
        return clean

    def canonical(self, path: str) -> str:
        """``path`` with symlinks already in the tree resolved in its parent directories."""
        parts = self._clean(path).split("/")
        out: list[str] = []
        for _ in range(40):
            for i, part in enumerate(parts[:-1]):
                cur = "/".join([*out, part])
                node = self.nodes.get(cur)
                if node is not None and stat.S_ISLNK(node.mode):
                    target = node.data.decode()
                    base = "/" + target if target.startswith("/") else "/".join(["", *out, target])
                    parts = [*self._clean(base).split("/"), *parts[i + 1 :]]
                    out = []
                    break
                out.append(part)
            else:
                return "/".join([*out, parts[-1]])
        raise ValueError(f"too many symlinks resolving {path!r}")

    def _add(self, path: str, node: _Node) -> str:
        name = self.canonical(path)
        parent = os.path.dirname(name)
        if parent:
            self.directory(parent)
        existing = self.nodes.get(name)
        if existing is not None and stat.S_ISDIR(existing.mode):
            if stat.S_ISDIR(node.mode):
                return name
            if any(n.startswith(name + "/") for n in self.nodes):
                raise ValueError(f"cannot replace non-empty directory {name!r}")
        self.nodes[name] = node
        return name

    def directory(self, path: str, mode: int = 0o755) -> str:
        return self._add(path, _Node(stat.S_IFDIR | mode))

    def file(self, path: str, data: bytes, mode: int = 0o644) -> str:
        return self._add(path, _Node(stat.S_IFREG | mode, data))

    def symlink(self, path: str, target: str) -> str:
        return self._add(path, _Node(stat.S_IFLNK | 0o777, target.encode()))

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> str:
        return self._add(path, _Node(stat.S_IFCHR | mode, rdev=(major, minor)))

    def copy_host_path(self, path: str, _depth: int = 0) -> None:
        """Copy a host file into the same path, recreating every symlink on the way."""
        if _depth > 40:
            raise ImageError(f"too many symlinks resolving {path}")
        from pathlib import PurePosixPath

        parts = PurePosixPath(os.path.normpath(path)).parts[1:]
        cur = "/"
        for i, part in enumerate(parts):
            here = os.path.join(cur, part)
            if os.path.islink(here):
                target = os.readlink(here)
                self.symlink(here, target)
                resolved = os.path.normpath(os.path.join(cur, target))
                self.copy_host_path(os.path.join(resolved, *parts[i + 1 :]), _depth + 1)
                return
            cur = here
        st = os.stat(cur)
        if stat.S_ISDIR(st.st_mode):
            self.directory(cur, stat.S_IMODE(st.st_mode))
        else:
            self.file(cur, read_file(cur), stat.S_IMODE(st.st_mode))

    def total_size(self) -> int:
        return sum(len(n.data) for n in self.nodes.values())

    def write_cpio(self, out: BinaryIO) -> None:
        """The tree as a newc cpio archive: parents before children, fixed owners and times."""
        for ino, name in enumerate(sorted(self.nodes), start=1):
            node = self.nodes[name]
            _write_cpio_entry(out, name, node.mode, node.data, ino, node.rdev)
        _write_cpio_entry(out, "TRAILER!!!", 0, b"", 0, (0, 0))
        pad = -out.tell() % 512
        out.write(b"\0" * pad)


def _write_cpio_entry(
    out: BinaryIO, name: str, mode: int, data: bytes, ino: int, rdev: tuple[int, int]
) -> None:
    encoded = name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(mode) else 1
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    header = b"070701" + b"".join(b"%08X" % v for v in fields)
    out.write(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
    out.write(data + b"\0" * (-len(data) % 4))


def read_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    """Parse a newc archive into {name: (mode, data)} (for tests and `image ls`)."""
    entries: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while pos + 110 <= len(data):
        if data[pos : pos + 6] != b"070701":
            raise ValueError(f"bad cpio magic at {pos}")
        values = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = values[1], values[6], values[11]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            break
        entries[name] = (mode, data[pos : pos + size])
        pos += size
        pos += -pos % 4
    return entries

"""The guest image builder's pure parts: kernel unpacking, cpio, module ordering, cache key."""

from __future__ import annotations

import gzip
import io
import json
import lzma
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from bonneville.backends import image
from bonneville.backends.image import build, python
from bonneville.backends.image.common import ImageError
from bonneville.backends.image.cpio import Tree, read_cpio
from bonneville.backends.image.kernel import (
    KERNEL_ARGS,
    KERNEL_ENV,
    MODULE_SIG_MAGIC,
    XZ_MAGIC,
    Kernel,
    extract_vmlinux,
    find_kernel,
    kernel_release_of,
    module_name,
    parse_modules_builtin,
    parse_modules_dep,
    read_module,
    resolve_modules,
    strip_module_signature,
)
from bonneville.spec.errors import BonnevilleError

ELF = b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 64


def _bzimage(payload: bytes, release: str = "6.1.0-99-test") -> bytes:
    """A fake bzImage: setup header announcing ``release``, then junk, then the payload."""
    head = bytearray(0x400)
    head[0x202:0x206] = b"HdrS"
    head[0x20E:0x210] = (0x300 - 0x200).to_bytes(2, "little")
    version = f"{release} (builder@test) #1 SMP".encode() + b"\0"
    head[0x300 : 0x300 + len(version)] = version
    return bytes(head) + b"junk" * 100 + payload + b"trailing-relocs" * 10


def test_extract_vmlinux_finds_the_xz_payload_after_a_false_magic() -> None:
    packed = lzma.compress(ELF, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    blob = _bzimage(XZ_MAGIC + b"not really xz" + packed)
    assert extract_vmlinux(blob) == ELF


def test_extract_vmlinux_gzip_and_plain_elf() -> None:
    assert extract_vmlinux(_bzimage(gzip.compress(ELF))) == ELF
    assert extract_vmlinux(ELF) == ELF


def test_extract_vmlinux_without_payload_is_an_image_error() -> None:
    not_elf = lzma.compress(b"hello", format=lzma.FORMAT_XZ)
    with pytest.raises(ImageError) as info:
        extract_vmlinux(_bzimage(not_elf))
    assert isinstance(info.value, BonnevilleError)


def test_kernel_release_from_setup_header(tmp_path: Path) -> None:
    path = tmp_path / "vmlinuz-whatever"
    path.write_bytes(_bzimage(b""))
    assert kernel_release_of(str(path)) == "6.1.0-99-test"
    (tmp_path / "plain").write_bytes(b"x" * 1000)
    assert kernel_release_of(str(tmp_path / "plain")) is None


def test_find_kernel_picks_newest_with_modules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    boot, mods = tmp_path / "boot", tmp_path / "modules"
    boot.mkdir()
    for release in ("6.1.0-9-amd64", "6.1.0-10-amd64", "6.2.0-1-amd64"):
        (boot / f"vmlinuz-{release}").write_bytes(b"")
    for release in ("6.1.0-9-amd64", "6.1.0-10-amd64"):  # 6.2 has no modules: skipped
        (mods / release).mkdir(parents=True)
        (mods / release / "modules.dep").write_text("")
    monkeypatch.setattr("bonneville.backends.image.kernel.BOOT_DIR", str(boot))
    monkeypatch.setattr("bonneville.backends.image.kernel.MODULES_ROOT", str(mods))
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    kernel = find_kernel()
    assert kernel.release == "6.1.0-10-amd64"
    assert kernel.path == str(boot / "vmlinuz-6.1.0-10-amd64")

    monkeypatch.setenv(KERNEL_ENV, str(boot / "vmlinuz-6.1.0-9-amd64"))
    assert find_kernel().release == "6.1.0-9-amd64"
    monkeypatch.setenv(KERNEL_ENV, str(boot / "vmlinuz-6.2.0-1-amd64"))
    with pytest.raises(ImageError, match="no modules"):
        find_kernel()

    monkeypatch.delenv(KERNEL_ENV)
    shutil.rmtree(mods)
    with pytest.raises(ImageError, match="install linux-image-amd64"):
        find_kernel()


# --- cpio -------------------------------------------------------------------------------------


def _sample_tree() -> Tree:
    tree = Tree()
    tree.symlink("/bin", "usr/bin")
    tree.file("/init", b"#!/bin/sh\necho hi\n", 0o755)
    tree.file("bin/busybox", b"\x7fELF busybox", 0o755)  # lands in usr/bin through the symlink
    tree.symlink("bin/sh", "busybox")
    tree.file("etc/odd-size", b"abc")
    tree.chardev("dev/console", 5, 1)
    tree.directory("tmp", 0o1777)
    return tree


def test_tree_resolves_symlinked_parents() -> None:
    tree = _sample_tree()
    assert "usr/bin/busybox" in tree.nodes
    assert "usr/bin/sh" in tree.nodes
    assert tree.canonical("/bin/sh") == "usr/bin/sh"
    assert "usr" in tree.nodes and stat.S_ISDIR(tree.nodes["usr"].mode)  # parents created


def test_cpio_round_trip() -> None:
    out = io.BytesIO()
    _sample_tree().write_cpio(out)
    data = out.getvalue()
    assert len(data) % 512 == 0
    entries = read_cpio(data)
    assert entries["init"] == (stat.S_IFREG | 0o755, b"#!/bin/sh\necho hi\n")
    assert entries["etc/odd-size"][1] == b"abc"
    assert entries["bin"] == (stat.S_IFLNK | 0o777, b"usr/bin")
    assert stat.S_ISCHR(entries["dev/console"][0])
    assert entries["tmp"][0] == stat.S_IFDIR | 0o1777
    names = list(entries)
    assert names.index("usr") < names.index("usr/bin") < names.index("usr/bin/busybox")


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio not installed")
def test_cpio_tool_reads_our_archive(tmp_path: Path) -> None:
    out = io.BytesIO()
    _sample_tree().write_cpio(out)
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}
    listing = subprocess.run(
        ["cpio", "-it", "--quiet"], input=out.getvalue(), capture_output=True, env=env, check=True
    ).stdout.decode()
    assert set(listing.split()) == set(read_cpio(out.getvalue()))
    content = subprocess.run(
        ["cpio", "-i", "--to-stdout", "--quiet", "usr/bin/busybox"],
        input=out.getvalue(),
        capture_output=True,
        env=env,
        check=True,
    ).stdout
    assert content == b"\x7fELF busybox"


def test_copy_host_path_recreates_symlink_chain(tmp_path: Path) -> None:
    real = tmp_path / "usr" / "lib"
    real.mkdir(parents=True)
    (real / "libx.so.1.2").write_bytes(b"lib")
    (real / "libx.so.1").symlink_to("libx.so.1.2")
    (tmp_path / "lib").symlink_to("usr/lib")
    tree = Tree()
    tree.copy_host_path(str(tmp_path / "lib" / "libx.so.1"))
    rel = str(tmp_path).lstrip("/")
    assert tree.nodes[f"{rel}/lib"].data == b"usr/lib"
    assert tree.nodes[f"{rel}/usr/lib/libx.so.1"].data == b"libx.so.1.2"
    assert tree.nodes[f"{rel}/usr/lib/libx.so.1.2"].data == b"lib"


# --- kernel modules ---------------------------------------------------------------------------

MODULES_DEP = """\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci.ko.xz: kernel/drivers/virtio/virtio_pci_modern_dev.ko \
kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/fs/netfs/netfs.ko:
kernel/net/9p/9pnet.ko:
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
"""


def test_modules_load_after_their_dependencies() -> None:
    deps = parse_modules_dep(MODULES_DEP)
    assert deps["virtio_pci"][0] == "kernel/drivers/virtio/virtio_pci.ko.xz"
    order = resolve_modules(["9p", "virtio_pci"], deps, optional=["virtio_rng", "absent"])
    names = [module_name(p) for p in order]
    assert sorted(names) == sorted(set(names))  # each once
    for module, (_, requires) in deps.items():
        if module in names:
            for dep in requires:
                assert names.index(module_name(dep)) < names.index(module)
    assert names[-1] == "virtio_rng"  # optional ones come after the wanted ones
    assert "absent" not in names


def test_builtin_modules_are_skipped_and_missing_ones_fail() -> None:
    deps = parse_modules_dep(MODULES_DEP)
    builtin = parse_modules_builtin("kernel/drivers/virtio/virtio_mmio.ko\n")
    assert resolve_modules(["virtio_mmio"], deps, builtin) == []
    with pytest.raises(ImageError, match="neither a module nor built in"):
        resolve_modules(["virtio_blk"], deps, builtin)


def test_strip_module_signature() -> None:
    body = b"\x7fELF module body"
    sig = b"S" * 300
    info = bytes([0, 0, 2, 0, 0, 0, 0, 0]) + len(sig).to_bytes(4, "big")
    signed = body + sig + info + MODULE_SIG_MAGIC
    assert strip_module_signature(signed) == body
    assert strip_module_signature(body) == body


def test_read_module_decompresses(tmp_path: Path) -> None:
    (tmp_path / "a.ko.xz").write_bytes(lzma.compress(b"\x7fELFa"))
    (tmp_path / "b.ko").write_bytes(b"\x7fELFb")
    assert read_module(str(tmp_path / "a.ko.xz")) == b"\x7fELFa"
    assert read_module(str(tmp_path / "b.ko")) == b"\x7fELFb"


# --- cache key and the image directory --------------------------------------------------------


@pytest.fixture
def inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Kernel, Path]:
    """Fake kernel, interpreter, busybox and guest package; the image dir under tmp_path."""
    mods = tmp_path / "modules" / "6.1.0-99-test"
    mods.mkdir(parents=True)
    (mods / "modules.dep").write_text(MODULES_DEP)
    vmlinuz = tmp_path / "vmlinuz-6.1.0-99-test"
    vmlinuz.write_bytes(_bzimage(lzma.compress(ELF)))
    for name in ("python", "busybox"):
        (tmp_path / name).write_bytes(name.encode())
    package = tmp_path / "guest"
    package.mkdir()
    for name in ("__init__.py", "protocol.py", "init.sh"):
        (package / name).write_text(f"# {name}\n")
    monkeypatch.setattr(python, "PYTHON", str(tmp_path / "python"))
    monkeypatch.setattr(build, "BUSYBOX", str(tmp_path / "busybox"))
    monkeypatch.setenv(image.IMAGE_DIR_ENV, str(tmp_path / "images"))
    kernel = Kernel(str(vmlinuz), "6.1.0-99-test", str(mods))
    monkeypatch.setattr(image, "find_kernel", lambda: kernel)
    monkeypatch.setattr(python, "guest_package_dir", lambda: package)
    return kernel, package


def test_cache_key_follows_every_input(inputs: tuple[Kernel, Path]) -> None:
    kernel, package = inputs
    key, recorded = image.compute_key(kernel, package)
    assert image.compute_key(kernel, package)[0] == key  # stable
    assert sorted(recorded["guest"]) == ["__init__.py", "protocol.py"]  # init.sh enters as "init"
    # Each module of the builder is hashed: changing any of them makes a new image.
    builder = sorted(p.name for p in Path(image.__file__).parent.glob("*.py"))
    assert sorted(recorded["builder"]) == builder
    assert {"__init__.py", "build.py", "cpio.py", "kernel.py", "python.py"} <= set(builder)

    (package / "agent.py").write_text("def main(argv): return 0\n")  # the agent appears
    key_agent = image.compute_key(kernel, package)[0]
    assert key_agent != key
    (package / "agent.py").write_text("def main(argv): return 1\n")  # the agent changes
    key_agent2 = image.compute_key(kernel, package)[0]
    assert key_agent2 != key_agent

    st = os.stat(kernel.path)  # the kernel is replaced (new mtime)
    os.utime(kernel.path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    key_kernel = image.compute_key(kernel, package)[0]
    assert key_kernel != key_agent2

    Path(python.PYTHON).write_bytes(b"python, upgraded")
    key_python = image.compute_key(kernel, package)[0]
    assert key_python != key_kernel

    (package / "init.sh").write_text("#!/bin/sh\nexec agent\n")  # /init changes
    assert image.compute_key(kernel, package)[0] != key_python


def test_missing_protocol_is_an_image_error(inputs: tuple[Kernel, Path]) -> None:
    kernel, package = inputs
    (package / "protocol.py").unlink()
    with pytest.raises(ImageError, match=r"protocol\.py is missing"):
        image.compute_key(kernel, package)


def _fake_build(calls: list[str]) -> object:
    def fake(out: Path, kernel: Kernel, package: Path, key: str, inputs: object) -> None:
        calls.append(key)
        (out / "vmlinux").write_bytes(b"elf")
        (out / "initramfs.img").write_bytes(b"cpio")
        (out / "manifest.json").write_text(json.dumps({"key": key}))

    return fake


def test_ensure_image_builds_once_then_takes_the_fast_path(
    inputs: tuple[Kernel, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(build, "build_into", _fake_build(calls))
    first = image.ensure_image()
    second = image.ensure_image()
    assert first == second and calls == [first.key]
    assert Path(first.kernel).read_bytes() == b"elf"
    assert first.kernel_args == KERNEL_ARGS
    assert image.image_status()["built"] is True

    image.build_image(force=True)
    assert calls == [first.key, first.key]

    _, package = inputs
    (package / "agent.py").write_text("# new agent\n")
    third = image.build_image(prune=True)
    assert third.key != first.key
    images = Path(os.environ[image.IMAGE_DIR_ENV])
    assert sorted(p.name for p in images.iterdir() if not p.name.startswith(".")) == [third.key]


def test_failed_build_leaves_nothing(
    inputs: tuple[Kernel, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(out: Path, *args: object) -> None:
        (out / "vmlinux").write_bytes(b"half")
        raise ImageError("boom")

    monkeypatch.setattr(build, "build_into", broken)
    with pytest.raises(ImageError, match="boom"):
        image.ensure_image()
    images = Path(os.environ[image.IMAGE_DIR_ENV])
    assert [p.name for p in images.iterdir()] == [".lock"]
    assert image.image_status()["built"] is False

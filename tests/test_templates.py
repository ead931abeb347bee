"""Template bookkeeping without VMs (backends/qemu/template.py): which templates are stale, and
`prune` removing exactly those. The real builds and clones are in integration/test_clone.py."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from bonneville.backends.qemu import template as templates
from bonneville.backends.qemu.cmdline import QemuOptions


def fake_build(spec: templates.TemplateSpec, directory: str) -> None:
    """What a build leaves (its memory and device state), without booting anything."""
    for name in (templates.MEMORY_FILE, templates.STATE_FILE):
        Path(directory, name).write_bytes(b"x")


def spec_for(kernel: Path, initrd: Path, nics: int = 0) -> templates.TemplateSpec:
    return templates.TemplateSpec(
        kernel=str(kernel),
        initrd=str(initrd),
        kernel_args=("quiet",),
        memory_mib=256,
        vcpus=1,
        nics=nics,
        options=QemuOptions(accel="tcg"),
    )


def test_prune_removes_exactly_the_templates_whose_inputs_changed(tmp_path: Path) -> None:
    base = str(tmp_path / "templates")
    old_image, new_image = tmp_path / "old", tmp_path / "new"
    for image in (old_image, new_image):
        image.mkdir()
        (image / "vmlinux").write_bytes(b"kernel " + image.name.encode())
        (image / "initramfs.img").write_bytes(b"initrd")
    current, _ = templates.ensure(
        spec_for(new_image / "vmlinux", new_image / "initramfs.img"), fake_build, base
    )
    replaced, _ = templates.ensure(
        spec_for(old_image / "vmlinux", old_image / "initramfs.img"), fake_build, base
    )
    gone, _ = templates.ensure(
        spec_for(old_image / "vmlinux", old_image / "initramfs.img", nics=1), fake_build, base
    )
    assert templates.prune(base) == []  # nothing changed yet
    # A rebuilt initramfs (same path, other content) and a guest image removed altogether.
    (old_image / "initramfs.img").write_bytes(b"another initrd")
    os.utime(old_image / "initramfs.img", ns=(1, 1))
    assert templates.stale_reason(replaced) == (
        f"its initrd {old_image / 'initramfs.img'} was replaced"
    )
    (old_image / "vmlinux").unlink()
    assert templates.stale_reason(gone) == f"its kernel {old_image / 'vmlinux'} is gone"
    removed = dict(templates.prune(base))
    assert set(removed) == {replaced.key, gone.key}
    assert [t.key for t in templates.list_templates(base)] == [current.key]


def test_a_template_of_another_format_is_stale(tmp_path: Path) -> None:
    base = str(tmp_path / "templates")
    (tmp_path / "vmlinux").write_bytes(b"k")
    (tmp_path / "initrd").write_bytes(b"i")
    made, _ = templates.ensure(
        spec_for(tmp_path / "vmlinux", tmp_path / "initrd"), fake_build, base
    )
    manifest = Path(made.path, templates.MANIFEST_FILE)
    data = json.loads(manifest.read_text())
    data["inputs"]["format"] = templates.FORMAT + 1
    manifest.write_text(json.dumps(data))
    assert [key for key, _ in templates.prune(base)] == [made.key]


def test_the_cpu_model_is_part_of_the_key(tmp_path: Path) -> None:
    (tmp_path / "vmlinux").write_bytes(b"k")
    (tmp_path / "initrd").write_bytes(b"i")
    default = spec_for(tmp_path / "vmlinux", tmp_path / "initrd")
    assert default.inputs()["cpu"] == "max,erms=off"
    other = replace(default, options=QemuOptions(accel="tcg", cpu="max"))
    assert other.key() != default.key()

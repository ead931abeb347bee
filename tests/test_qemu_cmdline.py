"""The QEMU command line, compared with golden files (tests/golden/qemu/*.txt, one arg a line)."""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest

from bonneville.backends.base import VMConfig
from bonneville.backends.qemu.backend import detect_accel
from bonneville.backends.qemu.cmdline import (
    BOOT_TB_SIZE_MIB,
    DEFAULT_TB_SIZE_MIB,
    Boot,
    BootMode,
    QemuOptions,
    build_argv,
    cpu_model,
    escape,
)
from bonneville.spec.errors import BackendError
from tests.golden_files import BASE_VM, compare_golden, golden

AGENT_FD = 5
QMP_FD = 6

BASE = BASE_VM
TCG = QemuOptions(accel="tcg")


def argv(config: VMConfig, options: QemuOptions = TCG, boot: Boot | None = None) -> list[str]:
    return build_argv(config, agent_fd=AGENT_FD, qmp_fd=QMP_FD, options=options, boot=boot)


CASES: dict[str, tuple[VMConfig, QemuOptions, Boot | None]] = {
    "plain": (BASE, TCG, None),
    "readonly": (replace(BASE, readonly_share=True), TCG, None),
    "smp2_512m": (replace(BASE, vcpus=2, memory_mib=512), TCG, None),
    "nic": (replace(BASE, nics=(("tap0", "02:42:ac:11:00:02"),)), TCG, None),
    "kvm": (BASE, QemuOptions(accel="kvm"), None),
    "microvm": (BASE, QemuOptions(machine="microvm,pit=off"), None),
    "template": (BASE, TCG, Boot(BootMode.TEMPLATE, "/var/lib/bonneville/tpl/mem")),
    "clone": (BASE, TCG, Boot(BootMode.CLONE, "/var/lib/bonneville/tpl/mem")),
    "template_nic": (
        replace(BASE, nics=(("", "52:54:00:00:00:01"),)),
        TCG,
        Boot(BootMode.TEMPLATE, "/var/lib/bonneville/tpl/mem"),
    ),
    "clone_nic": (
        replace(BASE, nics=(("bvtap0", "02:42:ac:11:00:02"),)),
        TCG,
        Boot(BootMode.CLONE, "/var/lib/bonneville/tpl/mem"),
    ),
}


def argv_text(config: VMConfig, options: QemuOptions, boot: Boot | None) -> str:
    """The golden form of a command line: one argument a line."""
    return "".join(f"{arg}\n" for arg in argv(config, options, boot))


GOLDEN = {name: golden("qemu", f"{name}.txt", partial(argv_text, *CASES[name])) for name in CASES}


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str) -> None:
    compare_golden(GOLDEN[name])


def test_argv_is_pure() -> None:
    assert argv(BASE) == argv(BASE)


def test_template_and_clone_differ_only_in_memory_sharing_cache_and_incoming() -> None:
    # A clone restores the template's device state: every device must be the same. The
    # translation cache is not part of that state: a boot's is larger (BOOT_TB_SIZE_MIB).
    mem = "/tpl/mem"
    template = argv(BASE, boot=Boot(BootMode.TEMPLATE, mem))
    clone = argv(BASE, boot=Boot(BootMode.CLONE, mem))
    expected = [
        a.replace("share=on", "share=off").replace(
            f"tb-size={BOOT_TB_SIZE_MIB}", f"tb-size={DEFAULT_TB_SIZE_MIB}"
        )
        for a in template
    ]
    assert clone[: len(template)] == expected
    assert clone[len(template) :] == ["-incoming", "defer"]


def test_a_boot_gets_a_larger_translation_cache_than_a_clone() -> None:
    cold = argv(BASE)
    assert cold[cold.index("-accel") + 1] == f"tcg,tb-size={BOOT_TB_SIZE_MIB}"
    clone = argv(BASE, boot=Boot(BootMode.CLONE, "/tpl/mem"))
    assert clone[clone.index("-accel") + 1] == f"tcg,tb-size={DEFAULT_TB_SIZE_MIB}"
    big = argv(BASE, QemuOptions(accel="tcg", tb_size_mib=512))
    assert big[big.index("-accel") + 1] == "tcg,tb-size=512"


def test_commas_in_paths_are_escaped() -> None:
    config = replace(BASE, share_dir="/a,b", run_dir="/r,x/")
    args = argv(config)
    assert "local,id=root,path=/a,,b,security_model=passthrough,multidevs=remap" in args
    assert "file,id=console,path=/r,,x/console.log" in args
    assert escape("a,,b") == "a,,,,b"


def test_no_initrd_no_append() -> None:
    args = argv(replace(BASE, initrd="", kernel_args=()))
    assert "-initrd" not in args and "-append" not in args


def test_optional_devices_can_be_left_out() -> None:
    options = QemuOptions(sandbox=False, rng=False, vmgenid=False, tb_size_mib=None, cpu="qemu64")
    args = argv(BASE, options)
    joined = " ".join(args)
    assert "-sandbox" not in args and "rng" not in joined and "vmgenid" not in joined
    assert args[args.index("-accel") + 1] == "tcg"
    assert args[args.index("-cpu") + 1] == "qemu64"


def test_cpu_model_is_max_without_erms_under_tcg_and_the_host_cpu_under_kvm() -> None:
    assert argv(BASE)[argv(BASE).index("-cpu") + 1] == "max,erms=off"
    assert cpu_model(QemuOptions(accel="kvm")) == "host"
    assert cpu_model(QemuOptions(accel="tcg", cpu="qemu64")) == "qemu64"


def test_cold_boot_takes_no_memory_file() -> None:
    with pytest.raises(ValueError):
        Boot(BootMode.COLD, "/x")
    with pytest.raises(ValueError):
        Boot(BootMode.CLONE)


# ----------------------------------------------------------------------- accelerator choice


def _cpuinfo(tmp_path: Path, flags: str) -> str:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nflags\t\t: fpu {flags} sse2\n\n")
    return str(path)


def test_accel_kvm_needs_vt_flag_and_device(tmp_path: Path) -> None:
    device = tmp_path / "kvm"
    device.write_text("")
    assert detect_accel({}, _cpuinfo(tmp_path, "vmx"), str(device)) == "kvm"
    assert detect_accel({}, _cpuinfo(tmp_path, "svm"), str(device)) == "kvm"
    # /dev/kvm present but no VT in the CPU flags (this project's machines): TCG.
    assert detect_accel({}, _cpuinfo(tmp_path, "pae"), str(device)) == "tcg"
    assert detect_accel({}, _cpuinfo(tmp_path, "vmx"), str(tmp_path / "missing")) == "tcg"
    assert detect_accel({}, str(tmp_path / "no-cpuinfo"), str(device)) == "tcg"


def test_accel_environment_overrides(tmp_path: Path) -> None:
    cpuinfo = _cpuinfo(tmp_path, "pae")
    assert detect_accel({"BONNEVILLE_ACCEL": "kvm"}, cpuinfo, "/nonexistent") == "kvm"
    assert detect_accel({"BONNEVILLE_ACCEL": "tcg"}, _cpuinfo(tmp_path, "vmx"), cpuinfo) == "tcg"
    with pytest.raises(BackendError, match="BONNEVILLE_ACCEL"):
        detect_accel({"BONNEVILLE_ACCEL": "hvf"}, cpuinfo, "/nonexistent")

"""The backends every integration suite runs against, as pytest parameters.

``libvirt-embed`` is libvirt's embedded QEMU driver (no daemon); ``libvirt-system`` goes
through libvirtd (started for the session by ``integration/conftest.py`` when none runs). The
URI reaches the CLI through $BONNEVILLE_LIBVIRT_URI, which the CLI's callers (dockerd,
containerd) and the monitor inherit.
"""

from __future__ import annotations

import pytest

BACKENDS = ["qemu", "libvirt-embed", "libvirt-system"]
URIS = {"libvirt-embed": "qemu:///embed", "libvirt-system": "qemu:///system"}


def use_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Select the backend of ``request.param`` for this test; its `--backend` name."""
    param = str(request.param)
    if param == "libvirt-system":
        request.getfixturevalue("libvirtd")
    if param in URIS:
        monkeypatch.setenv("BONNEVILLE_LIBVIRT_URI", URIS[param])
        return "libvirt"
    return param

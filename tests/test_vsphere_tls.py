"""vSphere TLS without a server: thumbprints read and written, the settings that choose the trust,
the SSL context each choice makes, the insecure warning, and how refusals read.
(integration/test_vsphere_tls.py has the handshakes, against vcsim over https.)"""

from __future__ import annotations

import logging
import re
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest

from bonneville.backends.vsphere import config as vconfig
from bonneville.backends.vsphere import tls
from bonneville.backends.vsphere.config import VSphereSettings
from bonneville.spec.errors import ConfigError

DIGEST = bytes(range(0xA0, 0xC0))
CANONICAL = "sha256:" + ":".join(f"{b:02X}" for b in DIGEST)


def settings(**overrides: Any) -> VSphereSettings:
    values: dict[str, Any] = {"url": "https://vc.example/sdk", "username": "u", "password": "p"}
    values.update(overrides)
    return VSphereSettings(**values)


# ---- thumbprints ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        CANONICAL,
        CANONICAL.lower(),
        CANONICAL.removeprefix("sha256:"),
        CANONICAL.removeprefix("sha256:").replace(":", ""),
        CANONICAL.removeprefix("sha256:").replace(":", "").lower(),
        "SHA256:" + CANONICAL.removeprefix("sha256:").replace(":", ""),
        f"  {CANONICAL}\n",
    ],
)
def test_a_thumbprint_is_read_in_any_of_its_spellings(text: str) -> None:
    assert tls.parse_thumbprint(text) == DIGEST
    assert tls.format_thumbprint(tls.parse_thumbprint(text)) == CANONICAL


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is not 64 hex digits of SHA-256"),
        ("sha256:AB:CD", "is not 64 hex digits of SHA-256"),
        (CANONICAL + ":00", "is not 64 hex digits of SHA-256"),
        (CANONICAL.replace("A0", "G0"), "is not 64 hex digits of SHA-256"),
        (":".join(["AB"] * 20), "is SHA-1: give the SHA-256 one"),
        ("sha1:" + ":".join(["AB"] * 20), "only sha256 is supported, not sha1"),
        ("sha512:" + "ab" * 64, "only sha256 is supported, not sha512"),
    ],
)
def test_a_bad_thumbprint_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        tls.parse_thumbprint(text)


def test_a_certificate_thumbprint_is_the_sha256_of_its_der() -> None:
    import hashlib

    der = b"0\x82 not really a certificate"
    assert tls.certificate_thumbprint(der) == tls.format_thumbprint(hashlib.sha256(der).digest())


# ---- settings -------------------------------------------------------------------------------


def load(
    tmp_path: Path, body: str, url: str = "https://vc.example/sdk", **env: str
) -> VSphereSettings:
    # A file of its own each time: settings caches each file it parsed by its path.
    path = tmp_path / f"config-{len(list(tmp_path.iterdir()))}.toml"
    path.write_text(f'[vsphere]\nurl = "{url}"\nusername = "u"\n' + body)
    environ = {"BONNEVILLE_CONFIG": str(path), "BONNEVILLE_VSPHERE_PASSWORD": "p"}
    return vconfig.load({**environ, **env})


def test_thumbprint_and_insecure_from_file_and_environment(tmp_path: Path) -> None:
    bare = CANONICAL.removeprefix("sha256:").replace(":", "").lower()
    assert load(tmp_path, f'thumbprint = "{bare}"\n').thumbprint == CANONICAL
    from_env = load(tmp_path, "", BONNEVILLE_VSPHERE_THUMBPRINT=bare)
    assert from_env.thumbprint == CANONICAL
    assert load(tmp_path, "insecure = true\n").insecure
    assert load(tmp_path, "", BONNEVILLE_VSPHERE_INSECURE="1").insecure
    assert not load(tmp_path, "insecure = false\n").insecure
    # The older spelling still works, from the file and from the environment.
    assert load(tmp_path, "verify_tls = false\n").insecure
    assert load(tmp_path, "", BONNEVILLE_VSPHERE_VERIFY_TLS="0").insecure
    assert not load(tmp_path, "verify_tls = true\n").insecure


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('thumbprint = "AB:CD"\n', "vsphere.thumbprint 'AB:CD' is not 64 hex digits of SHA-256"),
        ('thumbprint = "sha1:AB"\n', "only sha256 is supported"),
        ('insecure = "maybe"\n', "vsphere.insecure must be true or false"),
        (
            f'thumbprint = "{CANONICAL}"\ninsecure = true\n',
            "vsphere.thumbprint and vsphere.insecure exclude one another",
        ),
        (
            f'thumbprint = "{CANONICAL}"\nverify_tls = false\n',
            "vsphere.thumbprint and vsphere.insecure exclude one another",
        ),
        (
            'ca_file = "{ca}"\ninsecure = true\n',
            "vsphere.ca_file and vsphere.insecure exclude one another",
        ),
        (
            f'ca_file = "{{ca}}"\nthumbprint = "{CANONICAL}"\n',
            "vsphere.ca_file and vsphere.thumbprint exclude one another",
        ),
    ],
)
def test_tls_settings_errors(tmp_path: Path, body: str, message: str) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(tmp_path, body.replace("{ca}", str(ca)))


@pytest.mark.parametrize("body", [f'thumbprint = "{CANONICAL}"\n', "insecure = true\n"])
def test_a_pin_or_insecure_on_plain_http_is_refused(tmp_path: Path, body: str) -> None:
    key = body.split(" ", 1)[0]
    with pytest.raises(ConfigError, match=re.escape(f"vsphere.{key} needs an https url")):
        load(tmp_path, body, url="http://127.0.0.1:8989/sdk")


# ---- the context each choice makes ----------------------------------------------------------


def one_ca(tmp_path: Path) -> Path:
    """A file with one CA certificate (the first of the system's bundle)."""
    bundle = Path(ssl.get_default_verify_paths().openssl_cafile).read_text()
    first = bundle[: bundle.index("-----END CERTIFICATE-----") + 25]
    path = tmp_path / "ca.pem"
    path.write_text(first[first.index("-----BEGIN CERTIFICATE-----") :] + "\n")
    return path


def test_plain_http_has_no_context() -> None:
    assert tls.ssl_context(settings(url="http://127.0.0.1:8989/sdk")) is None


def test_by_default_chain_and_host_name_are_verified_against_the_system_cas() -> None:
    context = tls.ssl_context(settings())
    assert context is not None and not isinstance(context, tls.PinnedContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def test_ca_file_is_the_only_trust(tmp_path: Path) -> None:
    ca = one_ca(tmp_path)
    context = tls.ssl_context(settings(ca_file=str(ca)))
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert len(context.get_ca_certs()) == 1


def test_a_pin_replaces_chain_and_host_name() -> None:
    context = tls.ssl_context(settings(thumbprint=CANONICAL.lower()))
    assert isinstance(context, tls.PinnedContext)
    assert context.pin == DIGEST
    assert context.verify_mode == ssl.CERT_NONE and not context.check_hostname
    assert context.sslsocket_class is tls.PinnedSocket


def test_a_pinned_context_will_not_skip_the_handshake_check() -> None:
    context = tls.PinnedContext(DIGEST)
    left, right = socket.socketpair()
    with left, right, pytest.raises(ValueError, match="must shake hands on connect"):
        context.wrap_socket(left, do_handshake_on_connect=False)
    with pytest.raises(ValueError, match="wraps sockets only"):
        context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO())


def test_insecure_verifies_nothing_and_warns_at_every_session(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = settings(insecure=True)
    context = tls.ssl_context(cfg)
    assert context is not None
    assert context.verify_mode == ssl.CERT_NONE and not context.check_hostname
    with caplog.at_level(logging.WARNING, logger="bonneville.vsphere"):
        for _ in range(2):
            assert tls.session_context(cfg) is not None
        assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING"]
        assert "TLS to https://vc.example/sdk is not verified (vsphere.insecure)" in caplog.text
        caplog.clear()
        tls.session_context(settings())
        tls.session_context(settings(thumbprint=CANONICAL))
        assert caplog.records == []


# ---- how refusals read ----------------------------------------------------------------------


def verification_error(message: str) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] {message}")
    exc.verify_message = message
    exc.reason = "CERTIFICATE_VERIFY_FAILED"
    return exc


def test_refusals_read_as_one_line_that_says_what_to_set() -> None:
    mismatch = tls.ThumbprintMismatch("sha256:11:22", CANONICAL)
    assert str(mismatch) == f"certificate sha256:11:22 is not the pinned {CANONICAL}"
    assert tls.failure(settings(thumbprint=CANONICAL), mismatch) == (
        "TLS: https://vc.example/sdk presented certificate sha256:11:22, "
        f"not the one vsphere.thumbprint pins ({CANONICAL})"
    )
    assert tls.failure(settings(), verification_error("self-signed certificate")) == (
        "TLS verification of https://vc.example/sdk failed (self-signed certificate): set "
        "vsphere.ca_file to the CA that signed its certificate, or vsphere.thumbprint to the "
        "certificate's SHA-256 thumbprint"
    )
    assert tls.failure(
        settings(ca_file="/etc/ca.pem"), verification_error("certificate has expired")
    ) == (
        "TLS verification of https://vc.example/sdk against vsphere.ca_file /etc/ca.pem "
        "failed (certificate has expired)"
    )
    protocol = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    protocol.reason = "WRONG_VERSION_NUMBER"
    assert tls.failure(settings(), protocol) == (
        "TLS with https://vc.example/sdk failed: WRONG_VERSION_NUMBER"
    )

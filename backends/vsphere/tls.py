"""TLS to vCenter/ESXi: which server certificate the backend trusts, and how a refusal reads.

Three ways, chosen by the settings (`config.py`):

- by default the certificate chain and host name are verified against the system's CAs, or
  against `ca_file` alone when it is set;
- `thumbprint` pins the server's own certificate by the SHA-256 of its DER form (what vSphere
  shows as the "SHA-256 thumbprint"): the certificate is then trusted for that alone, chain
  and host name unchecked, as an ESXi host's self-signed certificate needs;
- `insecure` trusts anything; every session opened so logs a warning.

The pin lives in the context itself (`PinnedContext`): every socket it wraps checks the peer's
certificate when its handshake completes, before the caller can send a byte over it, so the
SOAP session (pyVmomi's connections, its version probe included) and the datastore's HTTP
transfers, which all wrap their sockets with this context, are held to it alike.
"""

from __future__ import annotations

import hashlib
import logging
import re
import socket
import ssl

TYPE_CHECKING = False
if TYPE_CHECKING:
    from bonneville.backends.vsphere.config import VSphereSettings

log = logging.getLogger("bonneville.vsphere")

PREFIX = "sha256:"
_HEX = re.compile(r"[0-9a-f]{64}")


def parse_thumbprint(text: str) -> bytes:
    """The SHA-256 digest a thumbprint names: `sha256:AB:CD:…`, or its 64 hex digits bare, in
    either case, with or without colons; ValueError says what is wrong."""
    value = text.strip().lower()
    if value.startswith(PREFIX):
        value = value[len(PREFIX) :]
    elif ":" in value and not re.fullmatch(r"[0-9a-f:]+", value):
        algorithm = value.split(":", 1)[0]
        raise ValueError(f"thumbprint {text!r}: only sha256 is supported, not {algorithm}")
    digits = value.replace(":", "")
    if not _HEX.fullmatch(digits):
        if re.fullmatch(r"[0-9a-f]{40}", digits):
            raise ValueError(f"thumbprint {text!r} is SHA-1: give the SHA-256 one")
        raise ValueError(f"thumbprint {text!r} is not 64 hex digits of SHA-256")
    return bytes.fromhex(digits)


def format_thumbprint(digest: bytes) -> str:
    """`sha256:AB:CD:…`, the form vSphere and the settings file use."""
    return PREFIX + ":".join(f"{b:02X}" for b in digest)


def certificate_thumbprint(der: bytes) -> str:
    """The SHA-256 thumbprint of a certificate in DER form."""
    return format_thumbprint(hashlib.sha256(der).digest())


class ThumbprintMismatch(ssl.SSLCertVerificationError):
    """The server presented another certificate than the pinned one."""

    def __init__(self, presented: str, pinned: str) -> None:
        message = f"certificate {presented} is not the pinned {pinned}"
        super().__init__(message)
        self.presented = presented
        self.pinned = pinned
        self.reason = "THUMBPRINT_MISMATCH"
        self.verify_message = message

    def __str__(self) -> str:
        return self.verify_message


class PinnedSocket(ssl.SSLSocket):
    """An SSLSocket of a PinnedContext: the handshake ends with the pin check, and a socket
    that fails it is closed before anything is sent over it."""

    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        context = self.context
        if isinstance(context, PinnedContext):
            der = self.getpeercert(binary_form=True) or b""
            if hashlib.sha256(der).digest() != context.pin:
                presented = certificate_thumbprint(der) if der else "(none)"
                raise ThumbprintMismatch(presented, format_thumbprint(context.pin))


class PinnedContext(ssl.SSLContext):
    """A client context that trusts exactly the certificate whose SHA-256 is ``pin``."""

    sslsocket_class = PinnedSocket

    def __new__(cls, pin: bytes) -> PinnedContext:
        return super().__new__(cls, ssl.PROTOCOL_TLS_CLIENT)

    def __init__(self, pin: bytes) -> None:
        super().__init__()
        self.pin = pin
        # The pin replaces the chain and the host name: OpenSSL must let the handshake through
        # for PinnedSocket to judge the certificate.
        self.check_hostname = False
        self.verify_mode = ssl.CERT_NONE

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        # Without the handshake in wrap_socket/connect, a first send would let OpenSSL do it
        # implicitly, past do_handshake and its check.
        if not do_handshake_on_connect:
            raise ValueError("a pinned TLS connection must shake hands on connect")
        return super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=True,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=server_hostname,
            session=session,
        )

    def wrap_bio(self, *args: object, **kwargs: object) -> ssl.SSLObject:
        raise ValueError("a pinned TLS context wraps sockets only")


def ssl_context(cfg: VSphereSettings) -> ssl.SSLContext | None:
    """The context for every connection to ``cfg.url`` (None for plain http)."""
    if cfg.scheme != "https":
        return None
    if cfg.thumbprint:
        return PinnedContext(parse_thumbprint(cfg.thumbprint))
    if cfg.insecure:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=cfg.ca_file or None)


def session_context(cfg: VSphereSettings) -> ssl.SSLContext | None:
    """ssl_context for a new vSphere session; with `insecure`, the warning every session logs."""
    if cfg.scheme == "https" and cfg.insecure and not cfg.thumbprint:
        log.warning(
            "TLS to %s is not verified (vsphere.insecure): anyone on the path can pose as the "
            "server and read the vSphere password; set vsphere.ca_file or vsphere.thumbprint",
            cfg.url,
        )
    return ssl_context(cfg)


def failure(cfg: VSphereSettings, exc: ssl.SSLError) -> str:
    """The one line a failed TLS handshake with ``cfg.url`` is reported as."""
    if isinstance(exc, ThumbprintMismatch):
        return (
            f"TLS: {cfg.url} presented certificate {exc.presented}, not the one "
            f"vsphere.thumbprint pins ({exc.pinned})"
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or exc
        if cfg.ca_file:
            return (
                f"TLS verification of {cfg.url} against vsphere.ca_file {cfg.ca_file} "
                f"failed ({reason})"
            )
        return (
            f"TLS verification of {cfg.url} failed ({reason}): set vsphere.ca_file to the CA "
            "that signed its certificate, or vsphere.thumbprint to the certificate's SHA-256 "
            "thumbprint"
        )
    return f"TLS with {cfg.url} failed: {getattr(exc, 'reason', None) or exc}"

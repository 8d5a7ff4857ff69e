"""TLS contexts: towards the backend (up-imapproxy's tls_* keys) and towards clients (ours).

The transport is the standard library's ``ssl`` through ``gevent.ssl``: handshakes and reads
yield to the hub like any gevent socket, so one slow handshake never stalls other clients.
(pyOpenSSL would need a hand-written want-read/want-write loop around every call; the README
records the choice and the figures.)

Backend side: ``tls_verify_server yes`` checks the certificate chain *and* the host name
(``server_hostname``, sent as SNI), which up-imapproxy does not; the CAs are ``tls_ca_file`` /
``tls_ca_path`` or the system's; ``tls_cert_file``/``tls_key_file`` present a client
certificate (a key that does not match is a start-up error); ``tls_ciphers`` and
``tls_no_tlsv1*`` narrow what is offered.

Client side: ``client_tls_cert_file`` (with its chain, or ``client_tls_chain_file``),
``client_tls_key_file``, ``client_tls_ciphers``, ``client_tls_min_version``. Contexts are
rebuilt on SIGHUP, so renewed certificates take effect for new connections while cached
backend sessions stay.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from gevent import ssl

from imapproxy.config import TLS_VERSIONS, Config

# client_tls_min_version: "TLSv1.2" is ssl.TLSVersion.TLSv1_2
VERSIONS = {name: ssl.TLSVersion[name.replace(".", "_")] for name in TLS_VERSIONS}


class TLSSetupError(Exception):
    """A TLS setting cannot be used (bad file, key mismatch, bad cipher list)."""


@contextlib.contextmanager
def _setting(key: str) -> Iterator[None]:
    try:
        yield
    except (OSError, ssl.SSLError, ValueError) as error:
        code = getattr(error, "reason", None)  # OpenSSL's, for an SSLError
        if code in _PLAIN_REASONS:
            raise TLSSetupError(f"{key}: {_PLAIN_REASONS[code]}") from None
        reason = getattr(error, "strerror", None) or code or str(error)
        raise TLSSetupError(f"{key}: {reason}") from None


_PLAIN_REASONS = {"KEY_VALUES_MISMATCH": "the private key does not match the certificate"}


def contexts(config: Config) -> tuple[ssl.SSLContext, ssl.SSLContext | None]:
    """The backend's and the clients' contexts; ``TLSSetupError`` if a setting cannot be used."""
    return backend_context(config), client_context(config)


def backend_context(config: Config) -> ssl.SSLContext:
    """The context for STARTTLS or implicit TLS towards the IMAP server."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = config.tls_verify_server
    context.verify_mode = ssl.CERT_REQUIRED if config.tls_verify_server else ssl.CERT_NONE
    with _setting("tls_ca_file" if config.tls_ca_file else "tls_ca_path"):
        if config.tls_ca_file or config.tls_ca_path:
            context.load_verify_locations(cafile=config.tls_ca_file, capath=config.tls_ca_path)
        else:
            context.load_default_certs()
    if config.tls_cert_file:
        with _setting("tls_key_file"):
            context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    if config.tls_ciphers:
        with _setting("tls_ciphers"):
            context.set_ciphers(config.tls_ciphers)
    _exclude_versions(context, config)
    return context


def _exclude_versions(context: ssl.SSLContext, config: Config) -> None:
    """tls_no_tlsv1, tls_no_tlsv1.1, tls_no_tlsv1.2.

    TLS 1.0 and 1.1 are never offered (the ``ssl`` module's minimum is TLS 1.2, and OpenSSL 3
    at Debian's security level refuses them anyway), so the first two keys change nothing;
    ``tls_no_tlsv1.2 yes`` leaves TLS 1.3 only. SSLv2 and SSLv3 do not exist here at all.
    """
    if config.tls_no_tlsv1_2:
        context.minimum_version = ssl.TLSVersion.TLSv1_3


def client_context(config: Config) -> ssl.SSLContext | None:
    """The server-side context for clients (STARTTLS and the implicit-TLS port), if any."""
    if not config.client_tls_cert_file:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with _setting("client_tls_cert_file"), _with_chain(config) as certificates:
        context.load_cert_chain(certificates, config.client_tls_key_file)
    if config.client_tls_ciphers:
        with _setting("client_tls_ciphers"):
            context.set_ciphers(config.client_tls_ciphers)
    context.minimum_version = VERSIONS[config.client_tls_min_version]
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return context


@contextlib.contextmanager
def _with_chain(config: Config) -> Iterator[str]:
    """The certificate file, or a memory file of certificate plus chain (never on disk)."""
    cert = config.client_tls_cert_file
    assert cert is not None
    if not config.client_tls_chain_file:
        yield cert
        return
    with open(cert, "rb") as first, open(config.client_tls_chain_file, "rb") as chain:
        data = first.read().rstrip(b"\n") + b"\n" + chain.read()
    fd = os.memfd_create("imapproxy-cert-chain")
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)

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

The files (``FILE_KEYS``) are read first, into memory, by ``read_files`` (as root at start-up)
or by the privileged reader after the privilege drop (``keeper``); contexts are then built from
those bytes: CAs as ``cadata``, a certificate and its key through anonymous memory files
(``memfd``, never on disk). So a key file stays readable by root only, and every error names
the setting's ``FILE:LINE: KEY:`` and the file that failed (``ConfigError``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

from gevent import ssl

from imapproxy.config import TLS_VERSIONS, Config
from imapproxy.errors import ConfigError

# client_tls_min_version: "TLSv1.2" is ssl.TLSVersion.TLSv1_2
VERSIONS = {name: ssl.TLSVersion[name.replace(".", "_")] for name in TLS_VERSIONS}
# The settings that name files read into memory (tls_ca_path is a directory OpenSSL searches
# at each handshake: CA certificates are public, the service user reads them).
FILE_KEYS = (
    "tls_ca_file",
    "tls_cert_file",
    "tls_key_file",
    "client_tls_cert_file",
    "client_tls_key_file",
    "client_tls_chain_file",
)
MAX_FILE_BYTES = 1 << 20  # a certificate chain is a few KiB; a bigger "PEM" file is a mistake
MEMORY_FILES = "/proc/self/fd"  # where a memfd has a path OpenSSL can open

Contents = Mapping[str, bytes]  # file key -> the file's bytes, for every key of file_paths()


def file_paths(config: Config) -> dict[str, str]:
    """The files the settings name, by key."""
    return {key: getattr(config, key) for key in FILE_KEYS if getattr(config, key)}


def read_file(path: str) -> bytes:
    """A certificate, key or CA file; ``OSError`` (with ``strerror``) if it cannot be had."""
    with open(path, "rb") as file:
        data = file.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise OSError(0, f"bigger than {MAX_FILE_BYTES} bytes: not a PEM file")
    return data


def read_files(config: Config) -> dict[str, bytes]:
    """Read every file the settings name, with this process's rights (start-up, or a proxy
    that never had root to drop)."""
    contents = {}
    for key, path in file_paths(config).items():
        try:
            contents[key] = read_file(path)
        except OSError as error:
            raise config.origin.error(key, f"{path}: {error.strerror or error}") from None
    return contents


def contexts(config: Config, contents: Contents) -> tuple[ssl.SSLContext, ssl.SSLContext | None]:
    """The backend's and the clients' contexts from ``contents``; ``ConfigError`` if a setting
    cannot be used."""
    return backend_context(config, contents), client_context(config, contents)


def backend_context(config: Config, contents: Contents) -> ssl.SSLContext:
    """The context for STARTTLS or implicit TLS towards the IMAP server."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = config.tls_verify_server
    context.verify_mode = ssl.CERT_REQUIRED if config.tls_verify_server else ssl.CERT_NONE
    if config.tls_ca_file:
        _load_cas(context, config, "tls_ca_file", contents["tls_ca_file"])
    if config.tls_ca_path:
        with _setting(config, "tls_ca_path", config.tls_ca_path):
            context.load_verify_locations(capath=config.tls_ca_path)
    if not (config.tls_ca_file or config.tls_ca_path):
        with _setting(config, "tls_ca_file", "the system's CA certificates"):
            context.load_default_certs()
    if config.tls_cert_file:
        key_key = "tls_key_file" if config.tls_key_file else "tls_cert_file"
        _load_chain(context, config, ("tls_cert_file",), key_key, contents)
    if config.tls_ciphers:
        with _setting(config, "tls_ciphers", None):
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


def client_context(config: Config, contents: Contents) -> ssl.SSLContext | None:
    """The server-side context for clients (STARTTLS and the implicit-TLS port), if any."""
    if not config.client_tls_cert_file:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    chain = ("client_tls_cert_file", "client_tls_chain_file")
    key_key = "client_tls_key_file" if config.client_tls_key_file else "client_tls_cert_file"
    _load_chain(context, config, tuple(k for k in chain if getattr(config, k)), key_key, contents)
    if config.client_tls_ciphers:
        with _setting(config, "client_tls_ciphers", None):
            context.set_ciphers(config.client_tls_ciphers)
    context.minimum_version = VERSIONS[config.client_tls_min_version]
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return context


# -- loading from memory --------------------------------------------------------------------------


def _load_cas(context: ssl.SSLContext, config: Config, key: str, data: bytes) -> None:
    _check_certificates(config, key, data)
    with _setting(config, key, getattr(config, key)):
        context.load_verify_locations(cadata=_pem_text(data))


def _load_chain(
    context: ssl.SSLContext,
    config: Config,
    cert_keys: tuple[str, ...],
    key_key: str,
    contents: Contents,
) -> None:
    """A certificate (with its chain) and its private key. Each certificate file is checked on
    its own first, so that a failure is pinned on the file that has it."""
    for cert_key in cert_keys:
        _check_certificates(config, cert_key, contents[cert_key])
    certificates = b"".join(contents[k].rstrip(b"\n") + b"\n" for k in cert_keys)
    key_path = getattr(config, key_key)
    with _setting(config, key_key, key_path, certificate=getattr(config, cert_keys[0])):
        if not os.path.isdir(MEMORY_FILES):
            raise OSError(0, f"{MEMORY_FILES} is missing (a chroot_directory without /proc?)")
        with _memory_file(certificates) as cert_path, _memory_file(contents[key_key]) as key:
            context.load_cert_chain(cert_path, key, password=_no_passphrase)


def _check_certificates(config: Config, key: str, data: bytes) -> None:
    """``key``'s file holds at least one well-formed certificate (a key beside it is fine)."""
    path = getattr(config, key)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=_pem_text(data))
    except (ssl.SSLError, ValueError):
        raise config.origin.error(key, f"{path}: no valid PEM certificate in it") from None


def _pem_text(data: bytes) -> str:
    return data.decode("ascii", "replace")  # PEM is ASCII; anything else fails to parse


def _no_passphrase() -> bytes:
    raise ValueError("the private key is encrypted; a key with a passphrase cannot be used")


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """A path to ``data`` in anonymous memory (never on disk), valid inside the block."""
    fd = os.memfd_create("imapproxy-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"{MEMORY_FILES}/{fd}"
    finally:
        os.close(fd)


@contextlib.contextmanager
def _setting(
    config: Config, key: str, path: str | None, certificate: str | None = None
) -> Iterator[None]:
    """An error inside becomes ``FILE:LINE: KEY: [PATH: ]reason``."""
    try:
        yield
    except ConfigError:
        raise
    except (OSError, ssl.SSLError, ValueError) as error:
        raise config.origin.error(key, _where(path, _reason(error, certificate))) from None


def _reason(error: Exception, certificate: str | None) -> str:
    code = getattr(error, "reason", None)  # OpenSSL's, for an SSLError
    if code == "KEY_VALUES_MISMATCH":
        return "the private key does not match the certificate" + (
            f" {certificate}" if certificate else ""
        )
    if isinstance(error, ssl.SSLError) and code is None and "PEM lib" in str(error):
        return "no valid PEM private key in it"
    if isinstance(error, ssl.SSLError) and error.args and isinstance(error.args[0], str):
        return error.args[0]  # e.g. set_ciphers: "No cipher can be selected."
    return getattr(error, "strerror", None) or code or str(error)


def _where(path: str | None, reason: str) -> str:
    return f"{path}: {reason}" if path else reason

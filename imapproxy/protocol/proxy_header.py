"""HAProxy's PROXY protocol header, v1 (text) and v2 (binary), as a receiver reads it.

Sans-I/O: ``parse(data)`` takes the bytes a connection has brought so far, from its first byte,
and answers ``NEED_DATA`` (a valid beginning, not yet whole), a ``ProxyHeader`` (whole; its
``length`` says how many bytes it took, what follows is the client's), or raises
``ProxyHeaderError``. It decides as early as the bytes allow, so a peer that is not sending a
header is refused at its first wrong byte rather than after a time-out. The caller reads ahead
without consuming (``MSG_PEEK``): after a header on the implicit-TLS port comes the ClientHello.

Rules, from the specification (haproxy ``doc/proxy-protocol.txt``):

* the receiver never guesses whether a header is there: a connection from a trusted sender must
  start with one, anything else is an error (§1);
* v1 is one line ``PROXY TCP4|TCP6 src dst sport dport`` CRLF, at most 107 bytes (§2.1);
  ``PROXY UNKNOWN`` (anything up to CRLF) means "use the connection's own addresses";
* v2 is a 16-byte block (signature, version/command, family/transport, length) and ``length``
  bytes of addresses and TLVs (§2.2). ``LOCAL`` (health checks from the sender itself) and the
  ``UNSPEC`` and ``UNIX`` families keep the connection's own addresses; datagram transports
  cannot come over a stream listener and are refused. TLVs are skipped.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final

from imapproxy.errors import ProxyError
from imapproxy.protocol.framing import NEED_DATA, Marker

V1_PREFIX: Final = b"PROXY "
V1_MAX_BYTES: Final = 107  # §2.1: the longest v1 line, CRLF included
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_BYTES: Final = 16
# §2.2: addresses take at most 216 bytes (UNIX); HAProxy's TLVs (ALPN, SSL details, unique id)
# add a few hundred. A sender that needs more than this is not one we were told to trust.
V2_MAX_BYTES: Final = V2_FIXED_BYTES + 1024
MAX_HEADER_BYTES: Final = V2_MAX_BYTES  # what a reader needs to look at, at most

_LOCAL, _PROXY = 0x0, 0x1
_UNSPEC, _TCP4, _TCP6, _UNIX_STREAM = 0x00, 0x11, 0x21, 0x31
_DATAGRAM = (0x12, 0x22, 0x32)
_ADDRESS_BYTES = {_TCP4: 12, _TCP6: 36, _UNIX_STREAM: 216}

Address = tuple[str, int]


class ProxyHeaderError(ProxyError):
    """The sender broke the PROXY protocol: the connection ends, with no IMAP reply."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A whole header: the client's and the server's address, or None for "the connection's
    own" (LOCAL, UNKNOWN, UNSPEC, UNIX)."""

    version: int
    length: int  # bytes on the wire
    client: Address | None
    server: Address | None


def parse(data: bytes, *, eof: bool = False) -> ProxyHeader | Marker:
    """The header at the start of ``data``, or ``NEED_DATA``; with ``eof``, no more will come."""
    result = _parse_v2(data) if data[:1] == V2_SIGNATURE[:1] else _parse_v1(data)
    if result is NEED_DATA and eof:
        raise ProxyHeaderError("connection closed in the PROXY header")
    return result


# -- v1 -------------------------------------------------------------------------------------------


def _parse_v1(data: bytes) -> ProxyHeader | Marker:
    if not data.startswith(V1_PREFIX[: len(data)]):
        raise ProxyHeaderError("no PROXY protocol header")
    end = data.find(b"\r\n", 0, V1_MAX_BYTES)
    if end < 0:
        window = data[:V1_MAX_BYTES]  # no CRLF in it: a LF, or a CR not last, is stray
        if b"\n" in window or b"\r" in window[:-1]:
            raise ProxyHeaderError("PROXY v1 header: stray CR or LF")
        if len(data) >= V1_MAX_BYTES:
            raise ProxyHeaderError("PROXY v1 header longer than 107 bytes")
        return NEED_DATA
    return _v1_fields(data[:end].split(b" "), end + 2)


def _v1_fields(fields: list[bytes], length: int) -> ProxyHeader:
    if len(fields) >= 2 and fields[1] == b"UNKNOWN":  # §2.1: the rest of the line is ignored
        return ProxyHeader(1, length, None, None)
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("PROXY v1 header: expected TCP4, TCP6 or UNKNOWN and 4 fields")
    version = 4 if fields[1] == b"TCP4" else 6
    client = (_v1_address(fields[2], version), _v1_port(fields[4]))
    server = (_v1_address(fields[3], version), _v1_port(fields[5]))
    return ProxyHeader(1, length, client, server)


def _v1_address(text: bytes, version: int) -> str:
    try:
        address = ipaddress.ip_address(text.decode("ascii"))
    except ValueError:  # UnicodeDecodeError is one
        raise ProxyHeaderError("PROXY v1 header: bad address") from None
    if address.version != version:
        raise ProxyHeaderError("PROXY v1 header: address of the wrong family")
    return str(address)


def _v1_port(text: bytes) -> int:
    if not (1 <= len(text) <= 5 and text.isdigit()) or int(text) > 65535:
        raise ProxyHeaderError("PROXY v1 header: bad port")
    return int(text)


# -- v2 -------------------------------------------------------------------------------------------


def _parse_v2(data: bytes) -> ProxyHeader | Marker:
    if not data.startswith(V2_SIGNATURE[: len(data)]):
        raise ProxyHeaderError("no PROXY protocol header")
    if len(data) > 12:
        _v2_check_version_command(data[12])
    if len(data) > 13:
        _v2_check_family(data[13])
    if len(data) < V2_FIXED_BYTES:
        return NEED_DATA
    length = V2_FIXED_BYTES + int.from_bytes(data[14:16], "big")
    if length > V2_MAX_BYTES:
        raise ProxyHeaderError(f"PROXY v2 header of {length} bytes: more than {V2_MAX_BYTES}")
    if len(data) < length:
        return NEED_DATA
    return _v2_addresses(data[12] & 0x0F, data[13], data[V2_FIXED_BYTES:length], length)


def _v2_check_version_command(byte: int) -> None:
    if byte >> 4 != 2:
        raise ProxyHeaderError("PROXY v2 header: unknown version")
    if byte & 0x0F not in (_LOCAL, _PROXY):
        raise ProxyHeaderError("PROXY v2 header: unknown command")


def _v2_check_family(byte: int) -> None:
    if byte in _DATAGRAM:
        raise ProxyHeaderError("PROXY v2 header: a datagram transport on a stream listener")
    if byte not in (_UNSPEC, *_ADDRESS_BYTES):
        raise ProxyHeaderError("PROXY v2 header: unknown address family or transport")


def _v2_addresses(command: int, family: int, block: bytes, length: int) -> ProxyHeader:
    needed = _ADDRESS_BYTES.get(family, 0)
    if len(block) < needed:
        raise ProxyHeaderError("PROXY v2 header: address block too short")
    if command == _LOCAL or family in (_UNSPEC, _UNIX_STREAM):  # §2.2: use the real addresses
        return ProxyHeader(2, length, None, None)
    size = 4 if family == _TCP4 else 16
    client_ip = ipaddress.ip_address(block[:size])
    server_ip = ipaddress.ip_address(block[size : 2 * size])
    ports = block[2 * size : 2 * size + 4]
    client = (str(client_ip), int.from_bytes(ports[:2], "big"))
    server = (str(server_ip), int.from_bytes(ports[2:], "big"))
    return ProxyHeader(2, length, client, server)

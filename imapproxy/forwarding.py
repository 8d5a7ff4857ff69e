"""The client's address for the IMAP server: Dovecot's forwarding fields in an RFC 2971 ID.

Sans-I/O. When the proxy opens a new backend session it tells the server who the client is,
as Dovecot's own login proxy does (``x-originating-ip``/``-port``: the client;
``x-connected-ip``/``-port``: where the client connected to; ``x-session-id``: the proxy's id of
this client connection, also in the proxy's log; ``x-proxy-ttl``: loop prevention). Dovecot
believes these only from its ``login_trusted_networks``, and only before login.

The ID sent is the client's own ID merged with these fields (``id_fields``). The fields belong to
the proxy: a client's own ``x-originating-*``, ``x-connected-*``, ``x-session-*``, ``x-proxy-ttl``
and ``x-forward-*`` would otherwise let anyone claim any address, so they are dropped, except
``x-originating-ip``/``-port`` and ``x-forward-*`` from ``forward_trusted_networks`` (a webmail
telling its browser user's address, as Roundcube's plugins do), which then win over the proxy's.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final

# Dovecot's default for a login proxy's TTL (``proxy_ttl``); each hop takes one off.
PROXY_TTL: Final = 5
MAX_ID_PAIRS: Final = 30  # RFC 2971 §3.3: a client MUST NOT send more than 30 field-value pairs

ORIGINATING_IP, ORIGINATING_PORT = b"x-originating-ip", b"x-originating-port"
_PROXY_OWNED = (b"x-originating-", b"x-connected-", b"x-session-", b"x-proxy-ttl", b"x-forward-")
_TRUSTED_CLIENT_MAY_SET = (ORIGINATING_IP, ORIGINATING_PORT, b"x-forward-")

IdFields = tuple[bytes | None, ...]  # key, value, key, value, ... (a value may be NIL)


@dataclass(frozen=True, slots=True)
class ClientOrigin:
    """Who the client is, as far as the proxy knows (after any PROXY protocol header)."""

    client_ip: str
    client_port: int
    connected_ip: str  # the address the client connected to
    connected_port: int
    session_id: str
    trusted: bool  # in forward_trusted_networks: its ID may give the originating address


def unmapped(host: str) -> str:
    """An IPv4-mapped IPv6 address (a dual-stack listener's view of an IPv4 client) as the
    IPv4 address it is, as the server would log a direct client."""
    if host.startswith("::ffff:") and "." in host:
        try:
            mapped = ipaddress.IPv6Address(host).ipv4_mapped
        except ValueError:
            return host
        return str(mapped) if mapped is not None else host
    return host


def _owned(key: bytes) -> bool:
    return key.lower().startswith(_PROXY_OWNED)


def _trusted_may_set(key: bytes) -> bool:
    return key.lower().startswith(_TRUSTED_CLIENT_MAY_SET)


def _pairs(client_id: IdFields | None) -> list[tuple[bytes, bytes | None]]:
    if client_id is None:
        return []
    pairs = zip(client_id[::2], client_id[1::2], strict=True)  # the session checked: even
    return [(key, value) for key, value in pairs if key is not None]


def id_fields(origin: ClientOrigin, client_id: IdFields | None) -> IdFields:
    """The ID to send at login: the forwarding fields and what the client may say of itself."""
    client = _pairs(client_id)
    believed = [(k, v) for k, v in client if origin.trusted and v and _trusted_may_set(k)]
    told = {k.lower() for k, _ in believed}
    ours: list[tuple[bytes, bytes | None]] = []
    if ORIGINATING_IP not in told:  # a trusted client's address comes with its own port, or none
        ours += [(ORIGINATING_IP, origin.client_ip.encode())]
        ours += [(ORIGINATING_PORT, b"%d" % origin.client_port)]
    ours += [
        (b"x-connected-ip", origin.connected_ip.encode()),
        (b"x-connected-port", b"%d" % origin.connected_port),
        (b"x-session-id", origin.session_id.encode()),
        (b"x-proxy-ttl", b"%d" % PROXY_TTL),
    ]
    ours += [(k, v) for k, v in believed if ORIGINATING_IP in told or k.lower() != ORIGINATING_PORT]
    own = [(k, v) for k, v in client if not _owned(k)]
    merged = (ours + own)[:MAX_ID_PAIRS]
    return tuple(item for pair in merged for item in pair)


def client_fields(origin: ClientOrigin, client_id: IdFields | None) -> IdFields | None:
    """The client's ID without the fields it may not set (when the proxy sends none of its
    own: forwarding off, or a server without ID); None when nothing is left."""
    kept = [
        (k, v)
        for k, v in _pairs(client_id)
        if not _owned(k) or (origin.trusted and _trusted_may_set(k))
    ]
    return tuple(item for pair in kept for item in pair) or None


def originating_ip(origin: ClientOrigin, client_id: IdFields | None) -> str:
    """The address the server is told the client has (``reuse_same_client_address``)."""
    if origin.trusted:
        for key, value in _pairs(client_id):
            if key.lower() == ORIGINATING_IP and value:
                return value.decode("ascii", "replace")
    return origin.client_ip

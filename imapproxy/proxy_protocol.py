"""Reading the PROXY protocol header off a new client connection: the gevent edge of
``protocol.proxy_header``.

Only from ``proxy_protocol_trusted_networks``, before anything else happens on the connection
(the greeting, the TLS handshake). The header is read ahead with ``MSG_PEEK`` and then exactly
its length is consumed, so that what follows it (a ClientHello on the implicit-TLS port) stays
in the socket for whoever reads next. Bounded: ``MAX_HEADER_BYTES`` and
``HEADER_TIMEOUT_S``; any failure is a ``ProxyHeaderError`` and the connection ends.
"""

from __future__ import annotations

import gevent
from gevent import socket

from imapproxy.protocol.proxy_header import (
    MAX_HEADER_BYTES,
    ProxyHeader,
    ProxyHeaderError,
    parse,
)

HEADER_TIMEOUT_S = 3.0  # Dovecot's haproxy_timeout: HAProxy sends the header as it connects
PEEK_RETRY_S = 0.01  # only part of the header has come: look again this much later


def read_header(sock: socket.socket, timeout: float = HEADER_TIMEOUT_S) -> ProxyHeader:
    """The header at the start of ``sock``, consumed; ``ProxyHeaderError`` if there is none."""
    expired = ProxyHeaderError(f"no whole PROXY header within {timeout:g} s")
    try:
        with gevent.Timeout(timeout, expired):
            return _read(sock)
    except OSError as error:
        raise ProxyHeaderError(f"connection failed in the PROXY header: {error}") from None


def _read(sock: socket.socket) -> ProxyHeader:
    while True:
        data = sock.recv(MAX_HEADER_BYTES, socket.MSG_PEEK)
        header = parse(data, eof=not data)
        if isinstance(header, ProxyHeader):
            _consume(sock, header.length)
            return header
        gevent.sleep(PEEK_RETRY_S)


def _consume(sock: socket.socket, length: int) -> None:
    """Take the header's bytes out of the socket (they are there: we have seen them)."""
    while length > 0:
        taken = len(sock.recv(length))
        if taken == 0:
            raise ProxyHeaderError("connection closed in the PROXY header")
        length -= taken

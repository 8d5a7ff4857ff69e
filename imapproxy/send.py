"""Sending on gevent sockets without a system call, or a Python layer, too many.

gevent's ``sendall`` asks the kernel for ``SO_SNDBUF`` (a ``getsockopt``) before every write,
to size its chunks, and its ``send`` is a Python function around the raw socket's. The proxy's
writes almost always fit the socket buffer, so ``send_all`` makes one ``send`` on the raw
(non-blocking) socket of a plain TCP connection, and leaves the rare remainder, a full socket
buffer, to gevent's ``sendall``, within ``timeout`` if one is given, else the socket's own.
A TLS socket is written through gevent (its records are encrypted there), within the same
time limit.
"""

from __future__ import annotations

from gevent import socket

_PLAIN = socket.socket  # gevent's; a TLS socket is a subclass and never written to raw


def send_all(
    sock: socket.socket, data: bytes | bytearray | memoryview, timeout: float | None = None
) -> None:
    """Send all of ``data``, as ``sendall`` does, usually in one system call."""
    if type(sock) is not _PLAIN:  # TLS: every write through gevent, within the time limit
        _send_through_gevent(sock, memoryview(data), timeout)
        return
    try:
        sent: int = sock._sock.send(data)
    except BlockingIOError:
        sent = 0
    if sent < len(data):
        _send_through_gevent(sock, memoryview(data)[sent:], timeout)


def _send_through_gevent(sock: socket.socket, data: memoryview, timeout: float | None) -> None:
    before = sock.gettimeout()
    if timeout is None or timeout == before:
        sock.sendall(data)
        return
    sock.settimeout(timeout)
    try:
        sock.sendall(data)
    finally:
        sock.settimeout(before)


def send_quietly(
    sock: socket.socket, data: bytes | bytearray | memoryview, timeout: float | None = None
) -> bool:
    """Send to a client that may be gone (or not read within ``timeout``); True if it took
    the data."""
    try:
        send_all(sock, data, timeout)
    except OSError:
        return False
    return True

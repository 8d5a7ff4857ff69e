"""Sending on gevent sockets without a system call too many.

gevent's ``sendall`` asks the kernel for ``SO_SNDBUF`` (a ``getsockopt``) before every write,
to size its chunks. The proxy's writes almost always fit the socket buffer, so ``send_all``
tries one plain ``send`` first and leaves the rare remainder to ``sendall``.
"""

from __future__ import annotations

from gevent import socket


def send_all(sock: socket.socket, data: bytes | bytearray | memoryview) -> None:
    """Send all of ``data``, as ``sendall`` does, usually in one system call."""
    sent = sock.send(data)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])


def send_quietly(sock: socket.socket, data: bytes | bytearray | memoryview) -> bool:
    """Send to a client that may be gone; True if it took the data."""
    try:
        send_all(sock, data)
    except OSError:
        return False
    return True

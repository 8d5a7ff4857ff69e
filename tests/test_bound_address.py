"""``server.bound_address``: a listener on one address tells its connections where they came."""

from __future__ import annotations

import pytest
from gevent import socket

from imapproxy.server import bound_address


def listener(family: socket.AddressFamily, host: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen()
    return sock


@pytest.mark.parametrize(
    ("family", "host", "one_address"),
    [
        (socket.AF_INET, "127.0.0.1", True),
        (socket.AF_INET, "0.0.0.0", False),
        (socket.AF_INET6, "::1", True),
        (socket.AF_INET6, "::", False),
    ],
)
def test_one_address_or_a_wildcard(
    family: socket.AddressFamily, host: str, one_address: bool
) -> None:
    with listener(family, host) as sock:
        address = bound_address(sock)
        if one_address:
            assert address == sock.getsockname()
        else:
            assert address is None


def test_a_socket_that_is_not_ip_has_none() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        assert bound_address(ours) is None

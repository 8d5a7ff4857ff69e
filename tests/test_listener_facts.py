"""What a listener tells the connections it accepts: where they came (``bound_address``), and
that ``TCP_NODELAY`` is on already (``set_nodelay``: the kernel copies it to each of them)."""

from __future__ import annotations

import pytest
from gevent import socket

from imapproxy.server import bound_address, set_nodelay


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


@pytest.mark.parametrize(
    ("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
)
def test_a_listeners_nodelay_is_every_accepted_connections(
    family: socket.AddressFamily, host: str
) -> None:
    with listener(family, host) as sock:
        assert set_nodelay(sock)
        with socket.create_connection(sock.getsockname()[:2]) as client:
            accepted, _ = sock.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
                assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0


def test_a_socket_that_is_not_tcp_gets_no_nodelay() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        assert not set_nodelay(ours)

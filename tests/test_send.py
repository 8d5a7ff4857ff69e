"""``send_all`` and ``send_quietly`` on real sockets, under gevent."""

from __future__ import annotations

from collections.abc import Iterator

import gevent
import pytest
import trustme
from gevent import socket, ssl

from imapproxy.send import send_all, send_quietly

BIG = 8 << 20  # far more than a socket buffer holds


def read_exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        piece = sock.recv(1 << 20)
        if not piece:
            break
        data += piece
    return bytes(data)


def test_a_small_write_arrives_whole(socket_pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = socket_pair
    send_all(ours, b"* OK [XPROXYREUSE]\r\n")
    send_all(ours, memoryview(b"A1 OK done\r\n"))
    assert read_exactly(theirs, 32) == b"* OK [XPROXYREUSE]\r\nA1 OK done\r\n"


def test_what_the_buffer_cannot_take_goes_once_the_peer_reads(
    socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = socket_pair
    data = bytes(range(256)) * (BIG // 256)
    reader = gevent.spawn(read_exactly, theirs, BIG)
    send_all(ours, data, timeout=10.0)
    assert reader.get(timeout=10) == data


def test_a_peer_that_reads_nothing_times_the_rest_out_and_the_timeout_is_put_back(
    socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _ = socket_pair
    ours.settimeout(7.0)
    with pytest.raises(TimeoutError):
        send_all(ours, bytes(BIG), timeout=0.05)
    assert ours.gettimeout() == 7.0


def test_a_closed_socket_is_an_error_and_quietly_false(
    socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = socket_pair
    theirs.close()
    assert send_quietly(ours, b"x" * 100_000) is False  # EPIPE or a reset
    ours.close()
    with pytest.raises(OSError):
        send_all(ours, b"x")
    assert send_quietly(ours, b"x") is False


@pytest.fixture
def tls_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A TLS connection over a socket pair: ours (the client end) and theirs."""
    ca = trustme.CA()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("imap.test").configure_cert(server_context)
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client_context)
    plain_ours, plain_theirs = socket.socketpair()
    theirs = gevent.spawn(server_context.wrap_socket, plain_theirs, server_side=True)
    ours = client_context.wrap_socket(plain_ours, server_hostname="imap.test")
    yield ours, theirs.get(timeout=10)
    ours.close()
    theirs.value.close()


def test_tls_goes_through_gevent_and_arrives(tls_pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = tls_pair
    data = b"A1 OK " * 100_000
    reader = gevent.spawn(read_exactly, theirs, len(data))
    send_all(ours, data, timeout=10.0)
    assert reader.get(timeout=10) == data


def test_tls_writes_keep_the_time_limit(tls_pair: tuple[socket.socket, socket.socket]) -> None:
    ours, _ = tls_pair
    assert ours.gettimeout() is None
    with pytest.raises(TimeoutError):  # the peer reads nothing: no write may wait for ever
        send_all(ours, bytes(BIG), timeout=0.05)
    assert ours.gettimeout() is None

"""``send_all`` and ``send_quietly`` on real sockets, under gevent."""

from __future__ import annotations

from collections.abc import Iterator

import gevent
import pytest
from gevent import socket

from imapproxy.send import send_all, send_quietly

BIG = 8 << 20  # far more than a socket buffer holds


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


def read_exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        piece = sock.recv(1 << 20)
        if not piece:
            break
        data += piece
    return bytes(data)


def test_a_small_write_arrives_whole(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    send_all(ours, b"* OK [XPROXYREUSE]\r\n")
    send_all(ours, memoryview(b"A1 OK done\r\n"))
    assert read_exactly(theirs, 32) == b"* OK [XPROXYREUSE]\r\nA1 OK done\r\n"


def test_what_the_buffer_cannot_take_goes_once_the_peer_reads(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    data = bytes(range(256)) * (BIG // 256)
    reader = gevent.spawn(read_exactly, theirs, BIG)
    send_all(ours, data, timeout=10.0)
    assert reader.get(timeout=10) == data


def test_a_peer_that_reads_nothing_times_the_rest_out_and_the_timeout_is_put_back(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _ = pair
    ours.settimeout(7.0)
    with pytest.raises(TimeoutError):
        send_all(ours, bytes(BIG), timeout=0.05)
    assert ours.gettimeout() == 7.0


def test_a_closed_socket_is_an_error_and_quietly_false(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    theirs.close()
    assert send_quietly(ours, b"x" * 100_000) is False  # EPIPE or a reset
    ours.close()
    with pytest.raises(OSError):
        send_all(ours, b"x")
    assert send_quietly(ours, b"x") is False

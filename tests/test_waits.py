"""``SocketWaits``: reads with a time limit on real sockets, under gevent."""

from __future__ import annotations

import gevent
import pytest
from gevent import socket

from imapproxy.waits import SocketWaits


def test_data_already_there_is_read_without_a_wait(
    socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = socket_pair
    waits = SocketWaits(ours)
    theirs.sendall(b"* OK here\r\n")
    gevent.sleep(0)
    assert waits.recv(100, 1.0) == b"* OK here\r\n"
    assert waits.waits == 0


def test_a_read_waits_for_what_comes_later(
    socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = socket_pair
    waits = SocketWaits(ours)
    gevent.spawn_later(0.01, theirs.sendall, b"A1 OK done\r\n")
    buffer = bytearray(100)
    count = waits.recv_into(memoryview(buffer), 5.0)
    assert bytes(buffer[:count]) == b"A1 OK done\r\n"
    assert waits.waits == 1


def test_nothing_within_the_time_is_a_timeout_and_the_socket_stays_usable(
    socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = socket_pair
    waits = SocketWaits(ours)
    with pytest.raises(TimeoutError):
        waits.recv(100, 0.02)
    theirs.sendall(b"late\r\n")
    assert waits.recv(100, 1.0) == b"late\r\n"  # watcher and timer were stopped, not spent


def test_the_end_of_the_stream_is_an_empty_read(
    socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = socket_pair
    waits = SocketWaits(ours)
    gevent.spawn_later(0.01, theirs.shutdown, socket.SHUT_WR)
    assert waits.recv(100, 5.0) == b""


def test_closing_the_socket_ends_a_wait_with_an_error(
    socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _ = socket_pair
    waits = SocketWaits(ours)
    gevent.spawn_later(0.01, ours.close)
    with pytest.raises(OSError) as raised:
        waits.recv(100, 5.0)
    assert not isinstance(raised.value, TimeoutError)


def test_a_timer_is_made_once_per_duration(
    socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    waits = SocketWaits(socket_pair[0])
    assert waits.timer(1.5) is waits.timer(1.5)
    assert waits.timer(1.5) is not waits.timer(30.0)
    waits.close()
    assert waits.timer(1.5) is not None  # made again after close


def test_a_wait_leaves_the_watcher_free_for_gevents_own_reads(
    socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = socket_pair
    waits = SocketWaits(ours)
    with pytest.raises(TimeoutError):
        waits.wait_readable(0.01)
    gevent.spawn_later(0.01, theirs.sendall, b"x")
    ours.settimeout(5.0)
    assert ours.recv(1) == b"x"  # gevent's recv waits on the same watcher


def test_what_is_left_of_a_deadline_keeps_no_timer(
    socket_pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = socket_pair
    waits = SocketWaits(ours)
    for n in range(20):
        gevent.spawn_later(0.001, theirs.sendall, b"%d\r\n" % n)
        assert waits.recv(100, 5.0 - n / 1000, once=True) == b"%d\r\n" % n
    with pytest.raises(TimeoutError):
        waits.recv(100, 0.01, once=True)
    assert waits.waits == 21
    assert not waits._timers  # one per wait, closed after it: none kept

"""A large literal through the kernel (``splice``): ``imapproxy.splice`` and ``Copier``'s use of
it, on real TCP connections over loopback."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import gevent
import pytest
from gevent import socket

from imapproxy import splice
from imapproxy.copier import BackendGone, Copier
from imapproxy.protocol.scanner import ResponseScanner

pytestmark = pytest.mark.skipif(not splice.AVAILABLE, reason="no os.splice here")


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        one = socket.create_connection(listener.getsockname())
        other, _ = listener.accept()
    return one, other


@contextlib.contextmanager
def two_pairs() -> Iterator[tuple[socket.socket, socket.socket, socket.socket, socket.socket]]:
    """(server, proxy's backend side, proxy's client side, client)."""
    server, backend = tcp_pair()
    client_side, client = tcp_pair()
    try:
        yield server, backend, client_side, client
    finally:
        for sock in (server, backend, client_side, client):
            sock.close()


def read_exactly(sock: socket.socket, count: int) -> bytes:
    chunks, got = [], 0
    while got < count:
        data = sock.recv(min(1 << 20, count - got))
        if not data:
            break
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def test_move_delivers_every_byte_in_order_and_keeps_the_pipe() -> None:
    payload = os.urandom(3 << 20)
    splice._free_pipes.clear()
    with two_pairs() as (server, backend, client_side, client):
        writer = gevent.spawn(server.sendall, payload)
        reader = gevent.spawn(read_exactly, client, len(payload))
        taken, delivered = splice.move(backend, client_side, len(payload), 5, 5)
        assert (taken, delivered) == (len(payload), True)
        assert reader.get(timeout=10) == payload
        writer.get(timeout=10)
    assert len(splice._free_pipes) == 1  # empty: kept for the next literal


def test_move_stops_at_the_count_and_leaves_what_follows() -> None:
    with two_pairs() as (server, backend, client_side, client):
        server.sendall(b"x" * 200_000 + b")\r\nA1 OK done\r\n")
        taken, delivered = splice.move(backend, client_side, 200_000, 5, 5)
        assert (taken, delivered) == (200_000, True)
        assert read_exactly(client, 200_000) == b"x" * 200_000
        assert backend.recv(100) == b")\r\nA1 OK done\r\n"


def test_a_literal_that_trickles_in_is_moved_whole() -> None:
    pieces = [os.urandom(30_000) for _ in range(12)]

    def trickle() -> None:
        for piece in pieces:
            server.sendall(piece)
            gevent.sleep(0.01)

    with two_pairs() as (server, backend, client_side, client):
        writer = gevent.spawn(trickle)
        reader = gevent.spawn(read_exactly, client, 360_000)
        assert splice.move(backend, client_side, 360_000, 5, 5) == (360_000, True)
        assert reader.get(timeout=10) == b"".join(pieces)
        writer.get(timeout=10)


def test_a_client_gone_ends_the_move_early_and_the_pipe_is_closed() -> None:
    splice._free_pipes.clear()
    with two_pairs() as (server, backend, client_side, client):
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.close()  # a reset: the proxy's sends fail
        writer = gevent.spawn(server.sendall, b"y" * (4 << 20))
        taken, delivered = splice.move(backend, client_side, 4 << 20, 5, 5)
        assert not delivered
        assert 0 < taken <= 4 << 20
        writer.kill()
    assert splice._free_pipes == []  # it may hold bytes of that reply: never lent again


def test_a_client_that_stops_reading_times_out() -> None:
    with two_pairs() as (server, backend, client_side, _client):
        writer = gevent.spawn(server.sendall, b"z" * (32 << 20))
        taken, delivered = splice.move(backend, client_side, 32 << 20, 5, 0.3)
        assert not delivered and taken < 32 << 20
        writer.kill()


def test_a_server_closing_mid_literal_is_reported() -> None:
    with two_pairs() as (server, backend, client_side, client):
        server.sendall(b"w" * 100_000)
        server.close()
        with pytest.raises(splice.SourceClosed):
            splice.move(backend, client_side, 300_000, 5, 5)
        assert read_exactly(client, 100_000) == b"w" * 100_000


def test_a_silent_server_times_out() -> None:
    with two_pairs() as (_server, backend, client_side, _client), pytest.raises(TimeoutError):
        splice.move(backend, client_side, 300_000, 0.2, 5)


# -- Copier: a FETCH whose literal goes through the kernel ----------------------------------------


def fetch_reply(body: bytes, tag: bytes = b"A1") -> bytes:
    return (
        b"* 1 FETCH (UID 7 BODY[] {%d}\r\n" % len(body)
        + body
        + b")\r\n"
        + tag
        + b" OK Fetch completed.\r\n"
    )


def copy_reply(reply: bytes, *, trace: bool = False) -> tuple[bytes, Copier, ResponseScanner]:
    with two_pairs() as (server, backend, client_side, client):
        for sock in (backend, client_side):
            sock.settimeout(5)
        scanner = ResponseScanner()
        seen: list[tuple[bytes, bytes]] = []

        def events() -> None:
            seen.extend(scanner.events)

        copier = Copier(backend, client_side, scanner, events)
        if trace:
            copier.trace = _NullTrace()  # type: ignore[assignment]
        writer = gevent.spawn(server.sendall, reply)
        reader = gevent.spawn(read_exactly, client, len(reply))
        copier.copy_until(lambda: (b"A1", b"OK") in seen)
        writer.get(timeout=10)
        return reader.get(timeout=10), copier, scanner


class _NullTrace:
    def server(self, data: bytes) -> None:
        pass


def test_copier_splices_a_large_literal_and_still_finds_the_completion() -> None:
    body = os.urandom(2 << 20) + b"\r\nA1 OK not a completion: data\r\n"
    reply = fetch_reply(body)
    got, copier, scanner = copy_reply(reply)
    assert got == reply
    assert copier.spliced > len(body) - 65536  # all but what the first read brought
    assert scanner.literal_remaining == 0 and scanner.at_boundary


def test_copier_reads_small_literals_itself() -> None:
    reply = fetch_reply(b"s" * 30_000)
    got, copier, _ = copy_reply(reply)
    assert got == reply and copier.spliced == 0


def test_copier_never_splices_what_a_trace_must_record() -> None:
    reply = fetch_reply(b"t" * (1 << 20))
    got, copier, _ = copy_reply(reply, trace=True)
    assert got == reply and copier.spliced == 0


def test_copier_reports_a_server_gone_mid_splice() -> None:
    with two_pairs() as (server, backend, client_side, client):
        backend.settimeout(5)
        copier = Copier(backend, client_side, ResponseScanner(), lambda: None)
        server.sendall(b"* 1 FETCH (BODY[] {500000}\r\n" + b"q" * 200_000)
        gevent.spawn_later(0.1, server.close)
        reader = gevent.spawn(read_exactly, client, 10 << 20)
        with pytest.raises(BackendGone):
            copier.copy_until(lambda: False)  # the first read, then the kernel's moves
        client_side.close()
        assert len(reader.get(timeout=5)) == len(b"* 1 FETCH (BODY[] {500000}\r\n") + 200_000


def test_a_client_gone_mid_splice_leaves_the_rest_to_the_drain() -> None:
    body = b"d" * (3 << 20)
    with two_pairs() as (server, backend, client_side, client):
        backend.settimeout(5)
        client_side.settimeout(5)
        scanner = ResponseScanner()
        seen: list[tuple[bytes, bytes]] = []
        copier = Copier(backend, client_side, scanner, lambda: seen.extend(scanner.events))
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.close()
        writer = gevent.spawn(server.sendall, fetch_reply(body))
        copier.copy_until(lambda: (b"A1", b"OK") in seen)
        writer.get(timeout=10)
        assert not copier.client_alive
        assert (b"A1", b"OK") in seen  # the session is at a boundary: reusable after all
        assert scanner.at_boundary and scanner.literal_remaining == 0

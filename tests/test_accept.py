"""Client connections accepted on the hub and served on kept greenlets (``accept``), on real
loopback sockets."""

from __future__ import annotations

import errno
import gc
import socket as stdlib_socket
import weakref
from collections.abc import Iterator
from typing import Any

import gevent
import pytest
from gevent import socket
from gevent.event import Event
from greenlet import getcurrent  # type: ignore[import-untyped]

from imapproxy.accept import ClientGreenlets, ClientListener


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock
    sock.close()


def _serve(
    listener: socket.socket, handle: Any, greenlets: ClientGreenlets | None = None
) -> tuple[ClientListener, ClientGreenlets]:
    greenlets = ClientGreenlets() if greenlets is None else greenlets  # empty: falsy
    server = ClientListener(listener, handle, greenlets)
    server.start()
    return server, greenlets


def _talk(listener: socket.socket, data: bytes = b"") -> bytes:
    """Connect, send ``data`` (unread data would make the server's close a reset), read until
    the server closes; what the server wrote."""
    with socket.create_connection(listener.getsockname(), timeout=5) as client:
        client.sendall(data)
        received = b""
        while chunk := client.recv(4096):
            received += chunk
        return received


def _echo_once(client: socket.socket, address: Any) -> None:
    client.sendall(b"you said " + client.recv(100))


def test_each_connection_is_served_and_closed_after(listening: socket.socket) -> None:
    server, greenlets = _serve(listening, _echo_once)
    try:
        for n in range(5):
            assert _talk(listening, b"%d\r\n" % n) == b"you said %d\r\n" % n
    finally:
        server.close()
    gevent.sleep(0)  # the last greenlet parks once its client is closed
    assert len(greenlets) == 0


def test_a_greenlet_serves_the_next_client_when_done(listening: socket.socket) -> None:
    served_by: list[object] = []

    def handle(client: socket.socket, address: Any) -> None:
        served_by.append(getcurrent())
        client.sendall(b"* OK\r\n")

    server, greenlets = _serve(listening, handle)
    try:
        for _ in range(4):
            assert _talk(listening) == b"* OK\r\n"
            gevent.sleep(0)
    finally:
        server.close()
    assert len(set(map(id, served_by))) == 1 and greenlets.idle == 1


def test_clients_at_once_get_greenlets_of_their_own(listening: socket.socket) -> None:
    release = Event()
    busy: list[int] = []

    def handle(client: socket.socket, address: Any) -> None:
        busy.append(len(greenlets))
        release.wait(5)
        client.sendall(b"done\r\n")

    server, greenlets = _serve(listening, handle)
    try:
        talks = [gevent.spawn(_talk, listening) for _ in range(3)]
        with gevent.Timeout(5):
            while len(busy) < 3:
                gevent.sleep(0.001)
        assert len(greenlets) == 3
        release.set()
        assert [t.get(timeout=5) for t in talks] == [b"done\r\n"] * 3
    finally:
        server.close()
    assert greenlets.join(timeout=5)
    assert greenlets.idle == 3


def test_idle_greenlets_are_bounded(listening: socket.socket) -> None:
    release = Event()

    def handle(client: socket.socket, address: Any) -> None:
        release.wait(5)

    server, greenlets = _serve(listening, handle, ClientGreenlets(max_idle=2))
    try:
        talks = [gevent.spawn(_talk, listening) for _ in range(5)]
        with gevent.Timeout(5):
            while len(greenlets) < 5:
                gevent.sleep(0.001)
        release.set()
        gevent.joinall(talks, timeout=5)
    finally:
        server.close()
    assert greenlets.join(timeout=5)
    assert greenlets.idle == 2


def test_an_exception_is_reported_and_the_greenlet_goes_on(
    listening: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    reported: list[type[BaseException]] = []
    hub = gevent.get_hub()
    monkeypatch.setattr(hub, "handle_error", lambda context, kind, value, tb: reported.append(kind))
    calls = 0

    def handle(client: socket.socket, address: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug")
        client.sendall(b"fine\r\n")

    server, greenlets = _serve(listening, handle)
    try:
        assert _talk(listening) == b""  # closed all the same
        gevent.sleep(0)
        assert _talk(listening) == b"fine\r\n"
    finally:
        server.close()
    assert reported == [RuntimeError]
    assert greenlets.idle == 1


def test_spawn_from_a_greenlet_runs_on_the_hubs_next_turn() -> None:
    greenlets = ClientGreenlets()
    ran: list[str] = []

    def caller() -> None:
        greenlets.spawn(ran.append, "job")
        ran.append("caller goes on")  # a switch straight in would never come back here

    gevent.spawn(caller).join(timeout=5)
    assert greenlets.join(timeout=5)
    assert ran == ["caller goes on", "job"]


def test_a_stray_switch_into_a_parked_greenlet_is_ignored() -> None:
    greenlets = ClientGreenlets()
    seen: list[object] = []

    def record() -> None:
        seen.append(getcurrent())

    greenlets.spawn(record)
    assert greenlets.join(timeout=5)
    parked = seen[0]
    hub = gevent.get_hub()
    hub.loop.run_callback(parked.switch, "a stale wake-up")  # type: ignore[attr-defined]
    hub.loop.run_callback(parked.throw, gevent.Timeout)  # type: ignore[attr-defined]
    gevent.sleep(0.01)
    greenlets.spawn(record)
    assert greenlets.join(timeout=5)
    assert seen == [parked, parked]


def test_join_waits_and_kill_ends_the_clients() -> None:
    greenlets = ClientGreenlets()
    ended: list[str] = []

    def forever() -> None:
        try:
            gevent.sleep(60)
        finally:
            ended.append("ended")

    for _ in range(2):
        greenlets.spawn(forever)
    gevent.sleep(0)
    assert not greenlets.join(timeout=0.01)
    greenlets.kill(timeout=5)
    assert ended == ["ended", "ended"] and len(greenlets) == 0 and greenlets.idle == 0


def test_out_of_descriptors_pauses_accepting(listening: socket.socket) -> None:
    server, greenlets = _serve(listening, _echo_once)
    try:
        server._failed(OSError(errno.EMFILE, "Too many open files"))
        client = socket.create_connection(listening.getsockname(), timeout=5)
        with client:
            client.sendall(b"x\r\n")
            for _ in range(3):
                gevent.sleep(0)  # the hub turns: the watcher is stopped, the timer not due
            assert len(greenlets) == 0
            assert client.recv(100) == b"you said x\r\n"  # after the pause
    finally:
        server.close()


def test_other_accept_errors_leave_the_listener_serving(listening: socket.socket) -> None:
    server, _ = _serve(listening, _echo_once)
    try:
        server._failed(OSError(errno.ECONNABORTED, "Software caused connection abort"))
        assert _talk(listening, b"hello\r\n") == b"you said hello\r\n"
    finally:
        server.close()


def test_a_listener_gone_closes_the_server(listening: socket.socket) -> None:
    server, _ = _serve(listening, _echo_once)
    server._failed(OSError(errno.EBADF, "Bad file descriptor"))
    assert server.closed
    assert listening.fileno() == -1


def test_a_stdlib_listener_works_too() -> None:
    plain = stdlib_socket.socket(stdlib_socket.AF_INET, stdlib_socket.SOCK_STREAM)
    plain.bind(("127.0.0.1", 0))
    plain.listen(4)
    server, _ = _serve(plain, _echo_once)  # type: ignore[arg-type]
    try:
        assert _talk(plain, b"hello\r\n") == b"you said hello\r\n"  # type: ignore[arg-type]
    finally:
        server.close()


def test_a_parked_greenlet_holds_nothing_of_its_last_client() -> None:
    greenlets = ClientGreenlets()

    class Secret:
        pass

    for _ in range(2):  # the second job is the one a parked greenlet could still hold
        secret = Secret()
        kept = weakref.ref(secret)
        greenlets.spawn(lambda value: None, secret)
        assert greenlets.join(timeout=5)
        del secret
        gc.collect()
        assert kept() is None and greenlets.idle == 1


def test_after_kill_clients_still_run_and_no_greenlet_is_kept() -> None:
    greenlets = ClientGreenlets()
    ran: list[int] = []
    greenlets.spawn(ran.append, 1)
    assert greenlets.join(timeout=5) and greenlets.idle == 1
    gevent.spawn(greenlets.spawn, ran.append, 2).join(timeout=5)  # queued for the hub's turn
    greenlets.kill(timeout=5)  # the idle one ends before the queued client starts
    assert greenlets.join(timeout=5)
    greenlets.spawn(ran.append, 3)
    assert greenlets.join(timeout=5)
    assert ran == [1, 2, 3] and len(greenlets) == 0 and greenlets.idle == 0

"""A worker that has handed over and stops: the others learn it through its inbox and hand it no
more clients (``WorkerChannel.announce_stopping``). Both channels live in this one process,
on real ``SOCK_SEQPACKET`` socket pairs, as the workers' would."""

from __future__ import annotations

from collections.abc import Iterator

import gevent
import pytest
from gevent import socket

from imapproxy import worker_channel
from imapproxy.credentials import Credentials
from imapproxy.worker_channel import Inboxes, WorkerChannel
from imapproxy.worker_message import HandedClient

CLIENT = HandedClient(
    tag=b"a1",
    credentials=Credentials(b"alice", b"secret", "LOGIN"),
    client_id=None,
    unread=b"",
    address=("192.0.2.7", 50123),
    connected_to=None,
    session_id="s1",
    tls=False,
)


class Worker:
    """A channel and what its inbox brought it."""

    def __init__(self, index: int, inboxes: Inboxes) -> None:
        self.channel = WorkerChannel(index, inboxes)
        self.clients: list[HandedClient] = []
        self.serving = gevent.spawn(self.channel.serve, self._client, lambda call: b"", self._x)

    def _client(self, handed: HandedClient, sock: socket.socket) -> None:
        self.clients.append(handed)
        sock.close()

    def _x(self, record: bytes, sock: socket.socket) -> None:
        sock.close()


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    inboxes = Inboxes.create(3)
    pool = [Worker(i, inboxes) for i in range(3)]
    yield pool
    for worker in pool:
        worker.serving.kill()
    for pair in inboxes.pairs:
        for end in pair:
            end.close()


def hand(worker: Worker, owner: int) -> bool:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        return worker.channel.hand_over(owner, CLIENT, theirs)


def test_every_client_handed_before_the_answers_is_in_and_none_after(
    workers: list[Worker],
) -> None:
    stopping, other, third = workers
    assert hand(other, 0) and hand(third, 0)  # before: sent to worker 0's inbox
    assert stopping.channel.announce_stopping(30.0)
    assert len(stopping.clients) == 2  # read by its inbox before the answers behind them
    assert other.channel.stopping(0) and third.channel.stopping(0)
    assert not hand(other, 0)  # from now on: served where it was accepted
    assert hand(other, 2)  # the others still take theirs
    gevent.sleep(0.05)
    assert len(stopping.clients) == 2 and len(third.clients) == 1


def test_a_worker_already_stopping_is_not_waited_for(workers: list[Worker]) -> None:
    first, second, _ = workers
    assert first.channel.announce_stopping(30.0)
    first.serving.kill()  # it is gone: it would never answer
    started = gevent.get_hub().loop.now()
    assert second.channel.announce_stopping(30.0)  # the third answers; the first is skipped
    assert gevent.get_hub().loop.now() - started < worker_channel.SEEN_TIMEOUT_S / 2


def test_a_silent_worker_costs_the_wait_and_no_more(
    workers: list[Worker], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_channel, "SEEN_TIMEOUT_S", 0.3)
    first, second, _ = workers
    second.serving.kill()
    started = gevent.get_hub().loop.now()
    assert not first.channel.announce_stopping(30.0)
    assert 0.25 <= gevent.get_hub().loop.now() - started < 1.0


def test_the_mark_ends(workers: list[Worker]) -> None:
    stopping, other, _ = workers
    assert stopping.channel.announce_stopping(0.2)
    assert not hand(other, 0)
    gevent.sleep(0.3)
    assert not other.channel.stopping(0)
    assert hand(other, 0)  # a restarted worker 0 gets its users again

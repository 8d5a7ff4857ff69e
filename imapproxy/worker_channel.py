"""The worker processes' channel to each other (``workers N``): an inbox per worker.

Each worker's inbox is a ``SOCK_SEQPACKET`` socket pair made by the supervisor before the
workers start: every worker holds the sending end of every inbox, and worker ``i`` alone reads
inbox ``i``. One packet is one message (``worker_message``), its descriptors beside it
(``SCM_RIGHTS``); the kernel keeps packets whole when several processes write to one end, and
a worker that is being restarted finds what was sent meanwhile waiting in its inbox.

* A client whose login names a user of another worker is sent there (``hand_over``): its socket,
  or, for a TLS client, one end of a local socket pair that this worker relays to
  (``relay_tls_client``), since TLS keys cannot change process.
* An ``XPROXY_*`` command that answers for the whole proxy is sent to every other worker with
  the end of a fresh socket pair on which each writes its part (``call_others``).
* A worker that has handed over to a successor and stops tells the others (``Stopping``) and
  waits until each has answered into its own inbox (``announce_stopping``): every client they
  handed it before is then in that inbox, and they hand it no more (they serve those users
  themselves), so no client reaches a worker that is about to exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass

import gevent
import gevent.event
from gevent import socket

from imapproxy import affinity, worker_message
from imapproxy.accept import SOCKET_GONE
from imapproxy.send import send_all
from imapproxy.session_transfer import SessionRecord
from imapproxy.worker_message import (
    AdminCall,
    HandedClient,
    HandedSession,
    MessageError,
    Stopping,
)

LOGGER = logging.getLogger("imapproxy")

INBOX_RETRY_S = 0.1  # after an error reading the inbox
SEND_TIMEOUT_S = 5.0  # an owner that does not take a client for this long: serve it here
SEEN_TIMEOUT_S = 2.0  # a stopping worker waits this long at most for the others' answers
ADMIN_REPLY_TIMEOUT_S = 5.0  # a worker's part of an XPROXY_* answer
INBOX_BUFFER_BYTES = 1 << 20
RELAY_CHUNK_BYTES = 65536


@dataclass
class Inboxes:
    """Every worker's inbox as a socket pair: ``[i][0]`` is written to, ``[i][1]`` read."""

    pairs: list[tuple[socket.socket, socket.socket]]

    @classmethod
    def create(cls, count: int) -> Inboxes:
        pairs = []
        for _ in range(count):
            writer, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            for end in (writer, reader):
                with contextlib.suppress(OSError):  # capped by net.core.[rw]mem_max
                    end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, INBOX_BUFFER_BYTES)
                    end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, INBOX_BUFFER_BYTES)
            pairs.append((writer, reader))
        return cls(pairs)


class WorkerChannel:
    """Worker ``index`` of ``count``: its inbox, and the way to the others'."""

    def __init__(self, index: int, inboxes: Inboxes) -> None:
        self.index = index
        self.count = len(inboxes.pairs)
        self._writers = [writer for writer, _ in inboxes.pairs]
        self._inbox = inboxes.pairs[index][1]
        self._stopping: dict[int, float] = {}  # worker -> until when (monotonic) it may stop
        self._seen: set[int] = set()  # workers that answered this one's Stopping
        self._seen_changed = gevent.event.Event()

    def owner(self, username: bytes) -> int:
        return affinity.owner(username, self.count)

    def owns_record(self, record: SessionRecord) -> bool:
        """Whether a session handed over from a predecessor is for a user of this worker."""
        return self.owner(record.username) == self.index

    def pass_session(self, record: bytes, username: bytes, sock: socket.socket) -> bool:
        """A predecessor's session (``record``: its ``session_transfer`` bytes) to the worker
        that owns ``username``; False if it could not go (the caller logs it out)."""
        try:
            data = worker_message.encode(HandedSession(record))
        except MessageError as error:
            LOGGER.warning("session not passed to its worker: %s", error)
            return False
        return self._send(self.owner(username), data, sock.fileno())

    def hand_over(self, owner: int, message: HandedClient, sock: socket.socket) -> bool:
        """Send a client to its owner; False if it could not go (then it is served here), or
        if the owner is stopping."""
        if self.stopping(owner):
            return False
        try:
            data = worker_message.encode(message)
        except MessageError as error:
            LOGGER.warning("client not handed to worker %d: %s", owner, error)
            return False
        if not self._send(owner, data, sock.fileno()):
            return False
        _forget(sock.fileno())
        return True

    def stopping(self, worker: int) -> bool:
        until = self._stopping.get(worker)
        return until is not None and time.monotonic() < until

    def announce_stopping(self, lasts_s: float) -> bool:
        """Tell every other worker that this one stops (for ``lasts_s`` at most), and wait
        until each has answered, ``SEEN_TIMEOUT_S`` at most; True if all did. Workers known
        to stop themselves are not waited for (they may be gone)."""
        data = worker_message.encode(Stopping(self.index, lasts_s))
        waited = set()
        for worker in range(self.count):
            known = worker == self.index or self.stopping(worker)
            if not known and self._send(worker, data, None):
                waited.add(worker)
        deadline = time.monotonic() + SEEN_TIMEOUT_S
        while not waited <= self._seen and (left := deadline - time.monotonic()) > 0:
            self._seen_changed.clear()
            self._seen_changed.wait(left)
        missing = waited - self._seen
        LOGGER.info(
            "worker %d stops: %d other workers answered, none hands it a client any more",
            self.index,
            len(waited - missing),
        )
        if missing:
            LOGGER.warning(
                "workers %s did not answer that worker %d stops", sorted(missing), self.index
            )
        return not missing

    def _took_note(self, message: Stopping) -> None:
        if message.seen:
            self._seen.add(message.worker)
            self._seen_changed.set()
            return
        self._stopping[message.worker] = time.monotonic() + message.lasts_s
        answer = worker_message.encode(Stopping(self.index, seen=True))
        self._send(message.worker, answer, None)  # behind what this worker handed it before

    def _send(self, worker: int, data: bytes, fd: int | None) -> bool:
        writer = self._writers[worker]
        try:
            with gevent.Timeout(SEND_TIMEOUT_S, TimeoutError):
                socket.send_fds(writer, [data], [] if fd is None else [fd])
        except OSError as error:  # TimeoutError is one
            LOGGER.warning("worker %d does not take messages (%s)", worker, error)
            return False
        return True

    def call_others(self, call: AdminCall) -> bytes:
        """Every other worker's untagged lines for ``call``, in worker order."""
        return b"".join(self.call_each_other(call))

    def call_each_other(self, call: AdminCall) -> list[bytes]:
        """Every other worker's answer to ``call`` (b"" from one that did not answer)."""
        data = worker_message.encode(call)
        return [self._call(worker, data) for worker in range(self.count) if worker != self.index]

    def _call(self, worker: int, data: bytes) -> bytes:
        ours, theirs = socket.socketpair()
        with ours:
            try:
                sent = self._send(worker, data, theirs.fileno())
            finally:
                theirs.close()
            if not sent:
                return b""
            return _read_to_end(ours, worker)

    def serve(
        self,
        on_client: Callable[[HandedClient, socket.socket], None],
        on_admin: Callable[[AdminCall], bytes],
        on_session: Callable[[bytes, socket.socket], None],
    ) -> None:
        """Read the inbox until the process ends: each message and its descriptor to its
        handler (in a greenlet of its own for a client)."""
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(
                    self._inbox, worker_message.MAX_MESSAGE_BYTES, 4
                )
            except OSError as error:
                LOGGER.error("worker %d inbox: %s", self.index, error)
                if error.errno in SOCKET_GONE:
                    return  # closed: the worker is ending
                gevent.sleep(INBOX_RETRY_S)  # out of memory, say: the other workers wait
                continue
            if flags & socket.MSG_CTRUNC:  # a descriptor dropped (this process at its limit)
                LOGGER.error("worker %d inbox: a message's descriptor was lost", self.index)
            self._dispatch(data, fds, on_client, on_admin, on_session)

    def _dispatch(
        self,
        data: bytes,
        fds: list[int],
        on_client: Callable[[HandedClient, socket.socket], None],
        on_admin: Callable[[AdminCall], bytes],
        on_session: Callable[[bytes, socket.socket], None],
    ) -> None:
        socks = [socket.socket(fileno=fd) for fd in fds]
        try:
            message = worker_message.decode(data)
            wanted = 0 if isinstance(message, Stopping) else 1
            if len(socks) != wanted:
                raise MessageError(f"{len(socks)} descriptors with a message, expected {wanted}")
        except MessageError as error:
            LOGGER.error("worker %d inbox: message refused: %s", self.index, error)
            for sock in socks:
                sock.close()
            return
        if isinstance(message, Stopping):
            self._took_note(message)
        elif isinstance(message, HandedClient):
            on_client(message, socks[0])
        elif isinstance(message, HandedSession):
            on_session(message.record, socks[0])
        else:
            gevent.spawn(_answer, socks[0], on_admin, message)


def _forget(fd: int) -> None:
    """Take a descriptor given to another process out of this loop's epoll set. libev leaves a
    stopped watcher's descriptor there until it reports something; the socket lives on in the
    owner, so it would report here too, after this worker closed its copy, and libev would
    then rebuild its whole epoll set (one epoll_ctl per descriptor it watches) to be rid of it."""
    try:
        backend = gevent.get_hub().loop.fileno()
    except (AttributeError, ValueError):
        return
    if backend is None or backend < 0:  # not an epoll loop: nothing lingers
        return
    epoll = select.epoll.fromfd(os.dup(backend))  # the same epoll set, closed on our own
    try:
        epoll.unregister(fd)
    except OSError:
        pass  # never registered, or already gone
    finally:
        epoll.close()


def _answer(sock: socket.socket, on_admin: Callable[[AdminCall], bytes], call: AdminCall) -> None:
    with sock, contextlib.suppress(OSError):
        sock.sendall(on_admin(call))


def _read_to_end(sock: socket.socket, worker: int) -> bytes:
    chunks = []
    try:
        with gevent.Timeout(ADMIN_REPLY_TIMEOUT_S, TimeoutError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except OSError as error:
        LOGGER.warning("worker %d did not answer an admin command (%s)", worker, error)
    return b"".join(chunks)


def relay_tls_client(client: socket.socket, local: socket.socket, timeout: float) -> None:
    """Carry a TLS client's bytes to and from its owner worker's end of ``local`` until either
    side ends: the owner applies every timeout and closes its end to end the relay; ``timeout``
    (beyond the owner's) bounds a send to a client that does not read (a client may be silent
    as long as the owner lets it)."""
    upward = gevent.spawn(_copy, client, local)
    try:
        _copy(local, client, timeout)
    finally:
        upward.kill(block=True, timeout=1)
        with contextlib.suppress(OSError):
            local.close()


def _copy(source: socket.socket, sink: socket.socket, timeout: float | None = None) -> None:
    try:
        while data := source.recv(RELAY_CHUNK_BYTES):
            send_all(sink, data, timeout)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)

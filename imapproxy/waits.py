"""Reading a gevent socket with a time limit, without a ``gevent.Timeout`` for every wait.

gevent's ``recv`` on a socket with a timeout starts a ``Timeout`` (a Python object, started,
cancelled and closed) each time it has to wait, and the relay changed the socket's timeout
before and after each of its own waits. A webmail page waits five times; ``SocketWaits`` does
each wait with what the loop offers in C: the socket's own read watcher, a timer per duration
made once, and a ``Waiter`` that either of them wakes.

A TLS socket is read the gevent way (its records are decrypted there): with ``settimeout``.

Closing the socket in another greenlet ends a wait as gevent's own do: the waiting greenlet
gets the ``cancel_wait`` error (an ``OSError``), since the watcher's callback is a ``Waiter``'s
``switch`` and gevent throws into its ``__self__``.
"""

from __future__ import annotations

from typing import Any

from gevent import get_hub, socket, ssl
from gevent.hub import Waiter

_READY, _TIMED_OUT = True, False


class SocketWaits:
    """Waits on one socket (``recv``, ``recv_into``, ``wait_readable``), each within
    ``seconds``: ``TimeoutError`` when it passes with nothing to read. ``waits`` counts the
    times the caller had to wait (a read that found data at once is not one).

    ``seconds`` is a duration used again and again (a setting: its timer is kept for the next
    wait), unless ``once`` says it is what is left of a deadline (a timer made for that wait
    and closed after it: the kept ones must stay few)."""

    __slots__ = ("sock", "waits", "_raw", "_watch", "_timers", "_loop")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.waits = 0
        # the raw socket is non-blocking: gevent sockets are, whatever their timeout says
        self._raw: Any = None if isinstance(sock, ssl.SSLSocket) else sock._sock
        self._watch: Any = sock._read_event
        self._loop: Any = get_hub().loop
        self._timers: dict[float, Any] = {}

    def recv_into(self, view: memoryview, seconds: float) -> int:
        raw = self._raw
        if raw is None:
            return self._tls_read(lambda: self.sock.recv_into(view), seconds)
        while True:
            try:
                count: int = raw.recv_into(view)
                return count
            except BlockingIOError:
                self.wait_readable(seconds)

    def recv(self, size: int, seconds: float, *, once: bool = False) -> bytes:
        raw = self._raw
        if raw is None:
            return self._tls_read(lambda: self.sock.recv(size), seconds)
        while True:
            try:
                data: bytes = raw.recv(size)
                return data
            except BlockingIOError:
                self.wait_readable(seconds, once=once)

    def recv_now(self, size: int) -> bytes | None:
        """What has arrived (b"" at the end of the stream), without waiting; None if nothing."""
        raw = self._raw
        try:
            if raw is not None:
                data: bytes = raw.recv(size)
                return data
            return self._tls_read(lambda: self.sock.recv(size), 0.0)
        except (BlockingIOError, ssl.SSLWantReadError, TimeoutError):
            return None

    def wait_readable(self, seconds: float, *, once: bool = False) -> None:
        """Until the socket is readable (maybe only its end), ``seconds`` at most."""
        self.waits += 1
        watch = self._watch
        timer = self._loop.timer(seconds) if once else self.timer(seconds)
        waiter: Waiter[bool] = Waiter()
        watch.start(waiter.switch, _READY)
        timer.start(waiter.switch, _TIMED_OUT)
        try:
            ready = waiter.get()
        finally:
            watch.stop()
            if once:
                timer.close()
            else:
                timer.stop()
        if ready is _TIMED_OUT:
            raise TimeoutError("timed out")

    def timer(self, seconds: float) -> Any:
        """A timer of ``seconds`` for this socket's waits, made once (another wait may use it
        too: the relay's wait for either side)."""
        timer = self._timers.get(seconds)
        if timer is None:
            timer = self._timers[seconds] = self._loop.timer(seconds)
        return timer

    @property
    def watcher(self) -> Any:
        """The socket's read watcher (for a wait on more than one socket)."""
        return self._watch

    def close(self) -> None:
        """Let go of the timers (the watcher is the socket's, closed with it)."""
        for timer in self._timers.values():
            timer.close()
        self._timers.clear()

    def _tls_read(self, read: Any, seconds: float) -> Any:
        sock = self.sock
        before = sock.gettimeout()
        sock.settimeout(seconds)
        try:
            return read()
        finally:
            sock.settimeout(before)

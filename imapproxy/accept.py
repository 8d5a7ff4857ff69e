"""Client connections: accepted on the hub, each served on a greenlet kept for the next one.

gevent's ``StreamServer`` makes a new ``Greenlet`` per connection, links it into a pool, and
tries a second ``accept`` that finds nothing; the new greenlet also maps and unmaps its frame
stack. Here a listener's readable event accepts one connection and switches straight into an
idle greenlet, which goes back to the idle list when its client is done: 25-35 µs less CPU per
connection on a 2-core machine (an ad hoc driver: connect, greeting, one command, close).

A kept greenlet runs its clients one after the other, never two at once: whatever one client's
code leaves behind (a stray wake-up from a wait it did not close) is caught when the greenlet
parks, and a wrong switch into a gevent wait raises ``InvalidSwitchError`` there, as it would in
a fresh greenlet.
"""

from __future__ import annotations

import errno
import logging
import os
import socket as stdlib_socket
import sys
from collections.abc import Callable
from typing import Any

from gevent import socket
from gevent.event import Event
from gevent.hub import Hub, get_hub
from greenlet import GreenletExit, getcurrent, greenlet  # type: ignore[import-untyped]

LOGGER = logging.getLogger("imapproxy")

MAX_IDLE_GREENLETS = 64  # kept for the next clients; beyond, a finished greenlet ends
PAUSE_MIN_S = 0.01  # after accept ran out of descriptors or memory, as gevent's server does
PAUSE_MAX_S = 1.0
# a socket call on a socket that is gone (closed); for accept(2), anything else not below is
# the one connection's trouble
SOCKET_GONE = frozenset({errno.EBADF, errno.EINVAL, errno.ENOTSOCK})
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class _Job:
    """What a parked greenlet is switched in with (any other switch is a stray one)."""

    __slots__ = ("function", "args")

    def __init__(self, function: Callable[..., object], args: tuple[Any, ...]) -> None:
        self.function: Callable[..., object] | None = function
        self.args = args

    def run(self) -> None:
        function, args = self.function, self.args
        self.function, self.args = None, ()  # emptied: a new greenlet's first switch keeps
        assert function is not None  # its arguments (this job) for the greenlet's life
        function(*args)


class ClientGreenlets:
    """The greenlets that serve clients: ``spawn`` runs a function on an idle one (or a new
    one), ``len`` counts those busy, ``join`` and ``kill`` are for the proxy's stop."""

    def __init__(self, max_idle: int = MAX_IDLE_GREENLETS) -> None:
        self._hub: Hub = get_hub()
        self._idle: list[greenlet] = []
        self._busy: set[greenlet] = set()
        self._none_busy = Event()
        self._none_busy.set()
        self.max_idle = max_idle
        self._killed = False  # after ``kill``: finished greenlets end instead of parking

    def __len__(self) -> int:
        return len(self._busy)

    @property
    def idle(self) -> int:
        return len(self._idle)

    def spawn(self, function: Callable[..., object], *args: Any) -> None:
        """Run ``function(*args)`` on a client greenlet: at once from the hub (an accept),
        else from the hub's next turn (a greenlet switching straight in would never resume)."""
        worker = self._take()
        job = _Job(function, args)
        if getcurrent() is self._hub:
            worker.switch(job)
        else:
            self._hub.loop.run_callback(self._start, worker, job)

    def _take(self) -> greenlet:
        """An idle greenlet, or a new one, counted busy from now: the client limit sees it."""
        worker = None
        while self._idle and worker is None:
            worker = self._idle.pop()
            if worker.dead:  # ended while parked (``kill``)
                worker = None
        if worker is None:
            worker = greenlet(self._work, parent=self._hub)
        self._busy.add(worker)
        self._none_busy.clear()
        return worker

    def _start(self, worker: greenlet, job: _Job) -> None:
        """The hub's turn after a spawn from a greenlet: ``kill`` may have ended the idle
        greenlet taken meanwhile, so a new one serves instead."""
        if worker.dead:
            self._busy.discard(worker)
            worker = greenlet(self._work, parent=self._hub)
            self._busy.add(worker)
        worker.switch(job)

    def _work(self, job: _Job | None) -> None:
        me = getcurrent()
        while job is not None:
            function = job.function
            try:
                job.run()
            except GreenletExit:
                return
            except BaseException:  # what gevent does for a greenlet's uncaught exception
                self._hub.handle_error(function, *sys.exc_info())
            finally:
                self._done(me)
            job = function = None  # no client's socket or credentials held while parked
            if self._killed or len(self._idle) >= self.max_idle:
                return
            self._idle.append(me)
            job = self._park(me)

    def _park(self, me: greenlet) -> _Job | None:
        """Wait for the next job; None: told to end while idle (and no longer idle)."""
        while True:
            try:
                arrived = self._hub.switch()
            except GreenletExit:
                if me in self._idle:
                    self._idle.remove(me)
                return None
            except BaseException as error:  # a stray throw left by an earlier client's code
                LOGGER.warning("a kept client greenlet ignored a stray %r", error)
                continue
            if isinstance(arrived, _Job):
                return arrived
            LOGGER.warning("a kept client greenlet ignored a stray switch")

    def _done(self, me: greenlet) -> None:
        self._busy.discard(me)
        if not self._busy:
            self._none_busy.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no client is being served; False: ``timeout`` came first."""
        return bool(self._none_busy.wait(timeout))

    def kill(self, timeout: float | None = None) -> None:
        """End every client being served (``GreenletExit`` from the hub, as gevent's ``kill``
        does), wait up to ``timeout`` for them; the idle ones end too, and none is kept after
        (a client spawned later gets a new greenlet)."""
        self._killed = True
        for worker in list(self._busy) + self._idle:
            self._hub.loop.run_callback(worker.throw, GreenletExit)
        self._idle.clear()
        self.join(timeout)


class ClientListener:
    """A listening socket's connections, each served by ``handle(client, address)`` on one
    of ``greenlets``, and closed after."""

    def __init__(
        self,
        listener: socket.socket,
        handle: Callable[[socket.socket, Any], object],
        greenlets: ClientGreenlets,
    ) -> None:
        self._listener = listener
        self._raw: stdlib_socket.socket = getattr(listener, "_sock", listener)  # the kernel's
        self._raw.setblocking(False)
        self._handle = handle
        self._greenlets = greenlets
        self._hub: Hub = get_hub()
        self._watcher: Any = None
        self._timer: Any = None
        self._pause_s = 0.0
        self.closed = False

    def start(self) -> None:
        self._watcher = self._hub.loop.io(self._raw.fileno(), 1)
        self._watcher.start(self._accept)

    def close(self) -> None:
        """Accept no more and close the listener (clients being served go on)."""
        self.closed = True
        self._stop_accepting()
        if self._watcher is not None:
            self._watcher.close()
        self._listener.close()

    def _accept(self) -> None:
        """One connection per readable event: the watcher fires again while more wait."""
        try:
            fd, address = self._raw._accept()  # type: ignore[attr-defined]
        except BlockingIOError:
            return
        except OSError as error:
            self._failed(error)
            return
        self._pause_s = 0.0
        raw = self._raw
        try:
            client = socket.socket(raw.family, raw.type, raw.proto, fileno=fd)
        except BaseException:
            os.close(fd)
            raise
        try:
            self._greenlets.spawn(self._serve, client, address)
        except BaseException:  # no greenlet to be had (out of memory): the client goes
            client.close()
            raise

    def _serve(self, client: socket.socket, address: Any) -> None:
        try:
            self._handle(client, address)
        finally:
            client.close()

    def _failed(self, error: OSError) -> None:
        if error.errno in SOCKET_GONE:
            LOGGER.error("listener %s failed: %s; no more connections on it", self._name(), error)
            self.close()
        elif error.errno in _OUT_OF_RESOURCES:
            # accepting again at once would fail again: wait, longer each time in a row
            self._pause_s = min(PAUSE_MAX_S, max(PAUSE_MIN_S, self._pause_s * 2))
            LOGGER.warning(
                "listener %s: accept failed (%s), pausing %.2f s",
                self._name(),
                error,
                self._pause_s,
            )
            self._stop_accepting()
            self._timer = self._hub.loop.timer(self._pause_s)
            self._timer.start(self._resume)
        # else (ECONNABORTED, a network error of the one connection): accept(2) says retry

    def _stop_accepting(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
        if self._timer is not None:
            self._timer.close()
            self._timer = None

    def _resume(self) -> None:
        self._timer = None
        if not self.closed:
            self._watcher.start(self._accept)

    def _name(self) -> str:
        try:
            return str(self._raw.getsockname())
        except OSError:
            return "(closed)"

"""Duplex mode (IDLE, NOTIFY): the pump greenlet that copies what the server says unprompted.

While the connection's greenlet waits for the client (IDLE's ``DONE``), the pump copies the
backend's bytes to the client (``Copier``). The two sides meet at three points:

* the proxy's own responses (``send_between``) go to the client only with the pump parked
  in ``recv`` at a response boundary, and the pump does not send while one is being written;
* the relay waits for the pump's progress (``wait_until``): a continuation, the idle state;
* ``stop`` ends duplex mode once the session is idle at a response boundary: the pump is
  killed parked in ``recv``, so nothing read is lost, and the session is sequential again.
"""

from __future__ import annotations

from collections.abc import Callable

import gevent
from gevent.event import Event

from imapproxy.copier import BackendGone, Copier, DrainExceeded
from imapproxy.relay_state import RelayState


class Pump:
    """One duplex period of a session; ``lost`` is called if the backend goes meanwhile."""

    def __init__(
        self,
        copier: Copier,
        state: RelayState,
        response_timeout: float,
        lost: Callable[[str], None],
        gone: Callable[[], str | None],
    ) -> None:
        self.copier, self.state = copier, state
        self.response_timeout = response_timeout
        self._lost, self._gone = lost, gone
        self._greenlet: gevent.Greenlet | None = None
        self._parked = False  # waits in recv: everything read has been sent
        self._client_writing = False
        self._stop_when_idle = False
        self._wakeup = Event()
        self._waiting = False

    @property
    def running(self) -> bool:
        return self._greenlet is not None

    @property
    def dead(self) -> bool:
        return self._greenlet is None or self._greenlet.dead

    def start(self) -> None:
        self._stop_when_idle = False
        self.copier.on_park = self._on_park
        self.copier.before_send = self._before_send
        self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        try:
            self.copier.copy_until(lambda: self._stop_when_idle and self.state.idle())
        except (BackendGone, DrainExceeded) as error:
            self._lost(str(error))
        finally:
            self._notify()

    def _on_park(self, parked: bool) -> None:
        self._parked = parked
        if parked:
            self._notify()

    def _before_send(self) -> None:
        while self._client_writing:  # the client side is writing a reply of its own
            self._wait(self.response_timeout)
        self._notify()

    def _notify(self) -> None:
        if self._waiting:
            self._wakeup.set()

    def _wait(self, timeout: float) -> bool:
        """Wait until the pump reports progress; False on timeout."""
        self._wakeup.clear()
        self._waiting = True
        try:
            return bool(self._wakeup.wait(timeout))
        finally:
            self._waiting = False

    def wait_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        deadline = gevent.get_hub().loop.now() + timeout
        while not condition():
            remaining = deadline - gevent.get_hub().loop.now()
            if remaining <= 0 or self._gone() or not self._wait(remaining):
                return condition()
        return True

    def send_between(self, send: Callable[[], None], at_boundary: Callable[[], bool]) -> bool:
        """Run ``send`` (a response of the proxy's own) with the pump parked at a response
        boundary; False if it never got there within the response time-out."""
        if not self.wait_until(lambda: self._parked and at_boundary(), self.response_timeout):
            return False
        self._client_writing = True
        try:
            send()
        finally:
            self._client_writing = False
            self._wakeup.set()
        return True

    def stop(self) -> bool:
        """Stop the pump once the session is idle at a response boundary; False if it never is."""
        self._stop_when_idle = True
        settled = self.wait_until(
            lambda: self.state.idle() and self._parked or self.dead, self.response_timeout
        )
        self.kill()
        self.copier.on_park = self.copier.before_send = None
        return settled and self.state.idle() and not self._gone()

    def kill(self) -> None:
        greenlet, self._greenlet = self._greenlet, None
        if greenlet is not None:
            greenlet.kill(block=True)  # parked in recv_into: nothing read is lost

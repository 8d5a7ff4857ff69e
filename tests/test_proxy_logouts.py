"""The proxy's background LOGOUTs (expired, evicted, replaced sessions), in-process."""

from __future__ import annotations

import gevent
import gevent.event

from imapproxy import stats
from imapproxy.backend import Backend
from imapproxy.config import Config
from imapproxy.server import LOGOUT_CONCURRENCY, Proxy


class SlowLogout:
    """A backend session whose LOGOUT takes until ``answered`` is set."""

    active = 0
    most = 0

    def __init__(self, answered: gevent.event.Event) -> None:
        self.answered = answered
        self.sd = 0

    def logout(self) -> None:
        SlowLogout.active += 1
        SlowLogout.most = max(SlowLogout.most, SlowLogout.active)
        try:
            self.answered.wait(10)
        finally:
            SlowLogout.active -= 1


def test_a_logout_to_come_never_makes_its_caller_wait() -> None:
    """Evicting a session for a login (its slot already ACTIVE) hands the old one's LOGOUT to
    the background: with more in flight than may run at once, the call still returns at once,
    and the servers see at most ``LOGOUT_CONCURRENCY`` at a time."""
    config = Config(server_hostname="127.0.0.1")
    proxy = Proxy(config, Backend(config), stats.Counters(bytearray(stats.FILE_SIZE)))
    answered = gevent.event.Event()
    with gevent.Timeout(2, AssertionError("a logout_later call waited")):
        for _ in range(LOGOUT_CONCURRENCY * 2):
            proxy.logout_later(SlowLogout(answered))  # type: ignore[arg-type]
    gevent.sleep(0.1)
    assert SlowLogout.most == LOGOUT_CONCURRENCY
    answered.set()
    assert proxy._logouts.join(timeout=5)
    assert SlowLogout.active == 0

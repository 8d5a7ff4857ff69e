"""The hand-over on restart, with real Dovecots: a successor takes the listeners and the cached
sessions of the running proxy (``--take-over``, SIGUSR2), and the bad cases leave it serving."""

from __future__ import annotations

import re
import signal
from collections.abc import Callable

from tests.support.client import REUSED, page
from tests.support.dovecot import DovecotInstance, User
from tests.support.proxy import ProxyProcess


def session_ids(dovecot: DovecotInstance, user: str) -> list[str]:
    """Dovecot's session ids of the user's logins, in order (its login process logs them)."""
    return re.findall(rf"Login: user=<{re.escape(user)}>.*session=<([^>]+)>", dovecot.log_text())


def logged_out_ids(dovecot: DovecotInstance, user: str) -> list[str]:
    pattern = rf"imap\({re.escape(user)}\)<[0-9]+><([^>]+)>: .*Logged out"
    return re.findall(pattern, dovecot.log_text())


def test_take_over_moves_the_cached_session(
    start_proxy: Callable[..., ProxyProcess], user: User, dovecot: DovecotInstance
) -> None:
    proxy = start_proxy()
    assert not page(proxy.host, proxy.port, user.name, user.password)[0].startswith(REUSED)
    proxy.wait_for_log(f"LOGOUT: '{user.name}' from server sd")
    (session,) = session_ids(dovecot, user.name)
    successor = proxy.successor().start()
    try:
        assert proxy.process is not None and proxy.process.wait(timeout=30) == 0
        assert page(proxy.host, proxy.port, user.name, user.password)[0].startswith(REUSED)
        assert session_ids(dovecot, user.name) == [session]  # no new login at Dovecot
        assert logged_out_ids(dovecot, user.name) == []
    finally:
        assert successor.stop(signal.SIGTERM) == 0
    print(proxy.log_text(), successor.log_text())
    assert session in logged_out_ids(dovecot, user.name)

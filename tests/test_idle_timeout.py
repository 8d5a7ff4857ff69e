"""``client_idle_timeout`` after login, against Dovecot: the silent client gets up-imapproxy's
BYE, and its session goes back to the cache in sync (the proxy's waits: ``waits.SocketWaits``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.support.client import REUSED, RawClient, assert_in_sync, logged_in, page
from tests.support.dovecot import User
from tests.support.proxy import ProxyProcess

AUTOLOGOUT = b"* BYE Autologout; idle for too long\r\n"


def reused_login(proxy: ProxyProcess, user: User) -> RawClient:
    client, replies = logged_in(proxy.host, proxy.port, user.name, user.password)
    assert replies[0].startswith(REUSED), replies
    return client


@pytest.mark.parametrize("first_command", [None, b"SELECT INBOX"])
def test_a_silent_client_is_logged_out_and_its_session_kept(
    start_proxy: Callable[..., ProxyProcess], user: User, first_command: bytes | None
) -> None:
    """Silent right after a reused login (the wait for its first command, which the reuse
    check overlaps), or after a command (the relay's wait for either side)."""
    proxy = start_proxy(client_idle_timeout=1)
    page(proxy.host, proxy.port, user.name, user.password)  # a session cached
    client = reused_login(proxy, user)
    if first_command is not None:
        assert client.command(b"s", first_command)[-1].startswith(b"s OK")
    assert client.is_closed(wait=10)
    assert client.buffer.endswith(AUTOLOGOUT), client.buffer
    client.close()
    again = reused_login(proxy, user)  # the same session, back in the cache
    assert_in_sync(again, user.name)
    again.close()

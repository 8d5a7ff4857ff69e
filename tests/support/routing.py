"""What the routing tests share: the users of the ``servers`` fixture (two real Dovecots with
the same user names, each user's mail naming the server it is on: "alice on A"), and helpers
to see where a login landed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.client import REUSED, RawClient, login
from tests.support.dovecot import DovecotInstance
from tests.support.proxy import ProxyProcess

USERS = ("alice", "bob", "carol", "dave")


def password(name: str) -> str:
    return f"pw-{name}-R0ute"


def write_map(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    path.chmod(0o644)
    return path


def at(instance: DovecotInstance) -> str:
    return f"{instance.host}:{instance.port}"


def server_of(client: RawClient, user: str) -> str:
    """Which server the session is on, from the user's mail there."""
    assert client.command(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
    fetched = b"".join(client.command(b"f", b"FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])"))
    for label in ("A", "B"):
        if f"{user} on {label}".encode() in fetched:
            return label
    raise AssertionError(fetched)


def visit(proxy: ProxyProcess, user: str) -> tuple[str, bool]:
    """Log in, see which server, log out: (server, reused). The socket is closed whatever
    happens (a socket left to the garbage collector warns in some later test)."""
    client, replies = login(proxy.host, proxy.port, user, password(user))
    with client:
        assert replies[-1].startswith(b"L1 OK"), replies
        where = server_of(client, user), replies[0].startswith(REUSED)
        client.command(b"z", b"LOGOUT")
        return where


def routed_proxy(
    start_proxy: Callable[..., ProxyProcess], default: DovecotInstance | None, **settings: Any
) -> ProxyProcess:
    base: dict[str, Any] = {"enable_admin_commands": True, "route_lookup_timeout": 3}
    if default is None:
        base["server_hostname"] = None
    return start_proxy(default or ("127.0.0.1", 9), **{**base, **settings})


def admin(proxy: ProxyProcess, command: bytes) -> list[bytes]:
    with RawClient(proxy.host, proxy.port) as client:
        return client.command(b"a", command)

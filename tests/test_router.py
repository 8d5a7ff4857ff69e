"""The router in-process: lookups under their time-out, the answer cache, no silent fallback,
one backend per server. The route source here is a ``ScriptedSource`` (a test double that
answers, sleeps or raises as told), since the faults are the point; real sources are tested
in test_routing.py and test_routing_directory.py."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest

from imapproxy.backend import Backend
from imapproxy.config import Config
from imapproxy.credentials import Credentials
from imapproxy.errors import NO_ROUTE_REPLY, BackendFailure, FailureKind
from imapproxy.route import Route, RouteRequest, RouteUnavailable, TLSMode
from imapproxy.router import Router, backend_config


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class ScriptedSource:
    """Answers from ``routes``; ``sleep_s`` blocks its thread first; ``error`` is raised."""

    routes: dict[str, Route] = field(default_factory=dict)
    blocking: bool = True
    sleep_s: float = 0.0
    error: Exception | None = None
    asked: list[str] = field(default_factory=list)
    name: str = "scripted source"

    def lookup(self, request: RouteRequest) -> Route | None:
        self.asked.append(request.username)
        time.sleep(self.sleep_s)  # in a thread of the router's pool: the hub goes on
        if self.error is not None:
            raise self.error
        return self.routes.get(request.username)

    def close(self) -> None:
        pass


ALICE = Credentials(b"alice", b"pw-alice")


def router(
    source: ScriptedSource, default: str | None = "imap0", **settings: object
) -> tuple[Router, FakeClock]:
    config = Config(server_hostname=default, route_lookup_timeout=1, route_cache_ttl=10, **settings)  # type: ignore[arg-type]
    clock = FakeClock()
    return Router(config, Backend(config), clock, source), clock


def test_routes_and_one_backend_per_server() -> None:
    source = ScriptedSource({"alice": Route("imap1", 143), "bob": Route("imap1", 143, None, b"b")})
    r, _ = router(source)
    alice = r.target(ALICE, b"d", "127.0.0.1:5")
    bob = r.target(Credentials(b"bob", b"x"), b"d", "127.0.0.1:6")
    assert alice.route == Route("imap1") and alice.backend is bob.backend  # the same server
    assert alice.backend is not r.default_backend and alice.backend.name == "imap1:143"
    carol = r.target(Credentials(b"carol", b"x"), b"d", "127.0.0.1:7")
    assert carol.route == Route("imap0") and carol.backend is r.default_backend


def test_answers_are_cached_for_the_ttl_and_failures_never() -> None:
    source = ScriptedSource({"alice": Route("imap1")})
    r, clock = router(source)
    r.target(ALICE, b"d", "x:1")
    clock.now += 9.9
    r.target(ALICE, b"d", "x:1")
    assert source.asked == ["alice"]
    clock.now += 0.2
    r.target(ALICE, b"d", "x:1")
    assert source.asked == ["alice", "alice"]
    source.error = RouteUnavailable("down")
    clock.now += 11
    for _ in range(2):
        with pytest.raises(BackendFailure):
            r.target(ALICE, b"d", "x:1")
    assert len(source.asked) == 4


def test_a_slow_source_gives_unavailable_after_the_timeout_never_the_default() -> None:
    r, _ = router(ScriptedSource({"alice": Route("imap1")}, sleep_s=3))
    started = time.monotonic()
    with pytest.raises(BackendFailure) as failure:
        r.target(ALICE, b"d", "x:1")
    assert 0.9 < time.monotonic() - started < 2
    assert failure.value.kind is FailureKind.ROUTE
    assert failure.value.response(b"a") == (
        b"a NO [UNAVAILABLE] Cannot find your IMAP server now, try again later\r\n"
    )


def test_a_drivers_surprise_fails_only_that_login() -> None:
    r, _ = router(ScriptedSource(error=ValueError("struct.error-like")))
    with pytest.raises(BackendFailure) as failure:
        r.target(ALICE, b"d", "x:1")
    assert failure.value.kind is FailureKind.ROUTE and "ValueError" in failure.value.detail


def test_no_route_no_default_is_authenticationfailed_and_odd_names_are_not_asked() -> None:
    source = ScriptedSource()
    r, _ = router(source, default=None, route_map="/unused")
    for name in (b"nobody", b"a\x01b", b"\xff"):
        with pytest.raises(BackendFailure) as failure:
            r.target(Credentials(name, b"x"), b"d", "x:1")
        assert failure.value.kind is FailureKind.AUTH_REJECTED
        assert failure.value.reply == NO_ROUTE_REPLY
    assert source.asked == ["nobody"]


def test_the_greeting_comes_from_the_default_server_or_the_first() -> None:
    r, _ = router(ScriptedSource({"alice": Route("imap1")}))
    assert not r.adopt_greeting(r.target(ALICE, b"d", "x:1"))
    assert r.adopt_greeting(r.target(Credentials(b"bob", b"x"), b"d", "x:1"))
    r, _ = router(ScriptedSource({"alice": Route("imap1")}), default=None, route_map="/unused")
    target = r.target(ALICE, b"d", "x:1")
    assert r.adopt_greeting(target) and not r.adopt_greeting(target)


def test_backend_settings_per_route() -> None:
    config = Config(server_hostname="imap0", server_tls=True, force_tls=False)
    clear = backend_config(config, Route("imap1", 143, TLSMode.CLEAR, None, 3))
    assert (clear.server_hostname, clear.server_tls, clear.force_tls) == ("imap1", False, False)
    assert clear.server_connect_timeout == 3
    starttls = backend_config(config, Route("imap1", 143, TLSMode.STARTTLS))
    assert (starttls.server_tls, starttls.force_tls) == (False, True)
    inherited = backend_config(config, Route("imap1", 993))
    assert (inherited.server_tls, inherited.server_connect_timeout) == (True, 10)


def test_down_addresses_are_skipped_and_all_down_fails_fast() -> None:
    """Two addresses of one server (here two listening sockets: a connect completes in the
    kernel's backlog); the one marked down is never tried, with or without dns_rr."""
    import socket

    from imapproxy.router import ServerHealth

    config = Config(server_hostname="127.0.0.1", server_down_after=1, dns_rr=True)
    with socket.socket() as first, socket.socket() as second:
        for listener in (first, second):
            listener.bind(("127.0.0.1", 0))
            listener.listen(16)
        down, up = first.getsockname(), second.getsockname()
        backend = Backend(config)
        backend.health = ServerHealth(config, FakeClock())
        backend.addresses = [down, up]
        backend.health.failed(backend, down, "test: refused")
        for _ in range(4):  # dns_rr would start at each address in turn
            sock, address = backend.connect()
            sock.close()
            assert address == up
        backend.addresses = [down, up]
        backend.health.failed(backend, up, "test: refused")
        started = time.monotonic()
        with pytest.raises(BackendFailure) as failure:
            backend.connect()
        assert failure.value.detail == "127.0.0.1:143 is marked down"
        assert time.monotonic() - started < 0.1

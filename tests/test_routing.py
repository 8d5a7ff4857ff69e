"""Routing to several real Dovecots, from a route map, SQLite and an HTTP auth service, and the
health of each server.

Two Dovecot instances on their own loopback ports hold the same user names, each user's mail
naming the server it is on ("alice on A"), so a login that lands on the wrong server is seen
in its mailbox; Dovecot's own log says which server each login reached.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest

from imapproxy.health import State, parse_servers, servers_path
from tests.support.client import RawClient, logged_in, login
from tests.support.dovecot import DovecotInstance, free_port, make_message, running_dovecot
from tests.support.polling import wait_until
from tests.support.proxy import ProxyProcess
from tests.support.routing import (
    admin,
    at,
    password,
    routed_proxy,
    server_of,
    visit,
    write_map,
)

# -- the route map -------------------------------------------------------------------------------


def test_each_user_lands_on_their_own_server_and_reuses_there(
    servers: dict[str, DovecotInstance], start_proxy: Callable[..., ProxyProcess], files: Path
) -> None:
    a, b = servers["A"], servers["B"]
    before = {(s, u): servers[s].logins(u) for s in "AB" for u in ("alice", "bob", "carol")}
    routes = write_map(files / "routes", [f"alice {at(a)}", f"bob {at(b)}", f"* {at(a)}"])
    proxy = routed_proxy(start_proxy, None, route_map=routes)
    assert admin(proxy, b"XPROXY_TRACE bob")[-1] == b"a OK Tracing enabled for user bob.\r\n"
    assert visit(proxy, "alice") == ("A", False)
    assert visit(proxy, "bob") == ("B", False)
    assert b"PROXY: LOGIN on new sd [" in proxy.trace_path.read_bytes()
    assert f"] on server {at(b)}".encode() in proxy.trace_path.read_bytes()
    assert visit(proxy, "carol") == ("A", False)  # "*"
    assert visit(proxy, "alice") == ("A", True)
    assert visit(proxy, "bob") == ("B", True)
    # each server saw only its own users' logins (Dovecot's log)
    after = {(s, u): servers[s].logins(u) for s in "AB" for u in ("alice", "bob", "carol")}
    assert {k: after[k] - before[k] for k in after} == {
        ("A", "alice"): 1,
        ("A", "bob"): 0,
        ("A", "carol"): 1,
        ("B", "alice"): 0,
        ("B", "bob"): 1,
        ("B", "carol"): 0,
    }
    dump = b"".join(admin(proxy, b"XPROXY_DUMPICC"))
    assert f" alice Cached {at(a)}\r\n".encode() in dump, dump
    assert f" bob Cached {at(b)}\r\n".encode() in dump, dump


def test_a_domain_route_and_destuser(
    servers: dict[str, DovecotInstance], start_proxy: Callable[..., ProxyProcess], files: Path
) -> None:
    """carol@example.com goes to B as "carol" (destuser), the default server stays A."""
    a, b = servers["A"], servers["B"]
    routes = write_map(files / "routes", [f"@example.com {at(b)} destuser=carol"])
    proxy = routed_proxy(start_proxy, a, route_map=routes)
    before_b = b.logins("carol")
    client, _ = logged_in(proxy.host, proxy.port, "carol@example.com", password("carol"))
    assert server_of(client, "carol") == "B"
    client.close()
    assert b.logins("carol") == before_b + 1
    assert visit(proxy, "carol") == ("A", False)  # no route: the default server


def test_no_route_and_no_default_server_is_authenticationfailed(
    servers: dict[str, DovecotInstance], start_proxy: Callable[..., ProxyProcess], files: Path
) -> None:
    routes = write_map(files / "routes", [f"alice {at(servers['A'])}"])
    proxy = routed_proxy(start_proxy, None, route_map=routes, auth_failure_delay=0)
    client, replies = login(proxy.host, proxy.port, "bob", password("bob"))
    client.close()
    assert replies == [b"L1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"]
    assert visit(proxy, "alice") == ("A", False)  # the other user is unaffected


def test_a_changed_map_takes_effect_on_sighup_without_the_old_session(
    servers: dict[str, DovecotInstance], start_proxy: Callable[..., ProxyProcess], files: Path
) -> None:
    a, b = servers["A"], servers["B"]
    routes = write_map(files / "routes", [f"dave {at(a)}"])
    proxy = routed_proxy(start_proxy, None, route_map=routes)
    assert visit(proxy, "dave") == ("A", False)
    write_map(routes, [f"dave {at(b)}"])
    assert proxy.process is not None
    proxy.process.send_signal(signal.SIGHUP)
    proxy.wait_for_log("reload:")
    assert visit(proxy, "dave") == ("B", False)  # a new session on B, not A's cached one
    assert visit(proxy, "dave") == ("B", True)
    write_map(routes, ["dave [bad"])  # an error in the file keeps the running routes
    proxy.process.send_signal(signal.SIGHUP)
    log = proxy.wait_for_log("route source kept as it was")
    assert f"{routes}:1: dave: bad bracketed address" in log
    assert visit(proxy, "dave") == ("B", True)


def test_a_bad_map_at_start_up_is_a_config_error(files: Path) -> None:
    from tests.support.proxy import run_imapproxyd, write_config

    routes = write_map(files / "routes", ["# routes", "alice host:99999"])
    conf = write_config(files / "imapproxy.conf", {"route_map": routes})
    result = run_imapproxyd("-f", str(conf), "--check-config")
    assert result.returncode == 78
    assert f"{routes}:2: alice: expected a port number from 1 to 65535" in result.stderr


# -- SQLite: a route change after the TTL ---------------------------------------------------------


def sqlite_routes(path: Path, rows: dict[str, tuple[str, int]]) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE IF NOT EXISTS routes (login TEXT PRIMARY KEY, host, port)")
        db.execute("DELETE FROM routes")
        db.executemany("INSERT INTO routes VALUES (?, ?, ?)", [(k, *v) for k, v in rows.items()])
    db.close()
    path.chmod(0o644)


SQL_QUERY = "SELECT host, port FROM routes WHERE login = :user"


def test_sqlite_route_change_takes_effect_after_the_ttl(
    servers: dict[str, DovecotInstance], start_proxy: Callable[..., ProxyProcess], files: Path
) -> None:
    a, b = servers["A"], servers["B"]
    database = files / "routes.db"
    sqlite_routes(database, {"dave": (a.host, a.port), "alice": (b.host, b.port)})
    proxy = routed_proxy(
        start_proxy,
        None,
        route_sql_url=f"sqlite:///{database}",
        route_sql_query=SQL_QUERY,
        route_cache_ttl=2,
    )
    assert visit(proxy, "dave") == ("A", False)
    assert visit(proxy, "alice") == ("B", False)
    b_logins = b.logins("dave")
    sqlite_routes(database, {"dave": (b.host, b.port), "alice": (b.host, b.port)})
    assert visit(proxy, "dave") == ("A", True)  # the answer is cached for 2 s
    time.sleep(2.2)
    assert visit(proxy, "dave") == ("B", False)  # new route: never A's cached session
    assert b.logins("dave") == b_logins + 1
    assert visit(proxy, "dave") == ("B", True)


NO_ROUTE = b"L1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
HOSTILE = [b"*", b")(", b"\\", b"'; --", b"x' OR '1'='1", b"%s%n", b"\xff\xfe", b"a" * 250]


def test_hostile_names_neither_inject_nor_crash_sqlite(
    servers: dict[str, DovecotInstance], start_proxy: Callable[..., ProxyProcess], files: Path
) -> None:
    a = servers["A"]
    database = files / "routes.db"
    sqlite_routes(database, {"alice": (a.host, a.port)})
    proxy = routed_proxy(
        start_proxy,
        None,
        route_sql_url=f"sqlite:///{database}",
        route_sql_query=SQL_QUERY,
        auth_failure_delay=0,
    )
    for name in HOSTILE:
        with RawClient(proxy.host, proxy.port) as client:
            client.send(b"L1 LOGIN {%d+}\r\n%s {2+}\r\npw\r\n" % (len(name), name))
            assert client.read_until_tagged(b"L1") == [
                b"L1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
            ], name
    assert_refused_before_lookup(proxy)
    assert visit(proxy, "alice") == ("A", False)
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT login FROM routes").fetchall() == [("alice",)]
    db.close()
    assert "Traceback" not in proxy.log_text()


def assert_refused_before_lookup(proxy: ProxyProcess) -> None:
    """A NUL and 1000 bytes never reach a source: the LOGIN itself is refused."""
    for name in (b"a\x00b", b"a" * 1000):
        with RawClient(proxy.host, proxy.port) as client:
            client.send(b"L1 LOGIN {%d+}\r\n%s {2+}\r\npw\r\n" % (len(name), name))
            reply = client.read_until_tagged(b"L1")[-1]
            assert reply.startswith((b"L1 NO", b"L1 BAD")), reply


# -- an HTTP auth service, as nginx's mail proxy would ask it ------------------------------------


class AuthService:
    """A small WSGI app speaking nginx's auth_http protocol, in a thread on loopback."""

    def __init__(self, routes: dict[str, tuple[str, int]]) -> None:
        self.routes = routes
        self.requests: list[dict[str, str]] = []
        self.delay_for: dict[str, float] = {}
        self.port = free_port()
        self._start()

    def _start(self) -> None:
        self.server = make_server(
            "127.0.0.1",
            self.port,
            self.app,
            server_class=_ThreadedWSGIServer,
            handler_class=_QuietHandler,
        )
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/auth"

    def app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        headers = {
            k[5:].replace("_", "-").title(): v for k, v in environ.items() if k.startswith("HTTP_")
        }
        self.requests.append(headers)
        user = headers.get("Auth-User", "")
        time.sleep(self.delay_for.get(user, 0))
        if user in self.routes:
            host, port = self.routes[user]
            answer = [("Auth-Status", "OK"), ("Auth-Server", host), ("Auth-Port", str(port))]
        else:
            answer = [("Auth-Status", "Invalid login or password"), ("Auth-Wait", "1")]
        start_response("200 OK", [*answer, ("Content-Length", "0")])
        return [b""]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def restart(self) -> None:
        self._start()


class _ThreadedWSGIServer(WSGIServer):
    daemon_threads = True
    allow_reuse_address = True

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread, args=(request, client_address), daemon=True
        )
        thread.start()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def auth_service(servers: dict[str, DovecotInstance]) -> Iterator[AuthService]:
    a, b = servers["A"], servers["B"]
    service = AuthService(
        {"alice": (a.host, a.port), "bob": (b.host, b.port), "slow": (a.host, a.port)}
    )
    yield service
    service.stop()


def test_http_auth_service_routes_like_nginx(
    servers: dict[str, DovecotInstance],
    start_proxy: Callable[..., ProxyProcess],
    auth_service: AuthService,
) -> None:
    proxy = routed_proxy(start_proxy, None, route_http_url=auth_service.url, auth_failure_delay=0)
    assert visit(proxy, "alice") == ("A", False)
    assert visit(proxy, "bob") == ("B", False)
    assert visit(proxy, "bob") == ("B", True)
    first = auth_service.requests[0]
    assert first["Auth-User"] == "alice" and first["Auth-Protocol"] == "imap"
    assert first["Auth-Method"] == "plain" and first["Client-Ip"] == "127.0.0.1"
    assert first["Auth-Login-Attempt"] == "1" and "Auth-Pass" not in first
    assert len(auth_service.requests) == 2  # bob's second login: the answer was cached
    started = time.monotonic()
    client, replies = login(proxy.host, proxy.port, "mallory", "x")
    client.close()
    assert replies == [b"L1 NO [AUTHENTICATIONFAILED] Invalid login or password\r\n"], (
        proxy.log_text()
    )
    assert time.monotonic() - started >= 0.9  # Auth-Wait: 1
    assert password("alice") not in proxy.log_text()


def test_http_sends_the_password_only_when_told(
    servers: dict[str, DovecotInstance],
    start_proxy: Callable[..., ProxyProcess],
    auth_service: AuthService,
) -> None:
    proxy = routed_proxy(
        start_proxy, None, route_http_url=auth_service.url, route_http_send_password=True
    )
    assert visit(proxy, "alice") == ("A", False)
    assert auth_service.requests[-1]["Auth-Pass"] == password("alice")
    assert password("alice") not in proxy.log_text()


def test_http_hostile_names_are_escaped_and_never_split_a_header(
    servers: dict[str, DovecotInstance],
    start_proxy: Callable[..., ProxyProcess],
    auth_service: AuthService,
) -> None:
    proxy = routed_proxy(start_proxy, None, route_http_url=auth_service.url, auth_failure_delay=0)
    denied = b"L1 NO [AUTHENTICATIONFAILED] Invalid login or password\r\n"
    for name in [*HOSTILE[:-2], "é x%".encode()]:
        with RawClient(proxy.host, proxy.port) as client:
            client.send(b"L1 LOGIN {%d+}\r\n%s {2+}\r\npw\r\n" % (len(name), name))
            assert client.read_until_tagged(b"L1") == [denied], name
    users = [r["Auth-User"] for r in auth_service.requests]
    assert users == ["*", ")(", "\\", "';%20--", "x'%20OR%20'1'='1", "%25s%25n", "%C3%A9%20x%25"]
    with RawClient(proxy.host, proxy.port) as client:  # CR LF in a name: never sent at all
        name = b"a\r\nAuth-Pass: pw"
        client.send(b"L1 LOGIN {%d+}\r\n%s {2+}\r\npw\r\n" % (len(name), name))
        assert client.read_until_tagged(b"L1") == [NO_ROUTE]
    assert len(auth_service.requests) == len(users)
    assert visit(proxy, "alice") == ("A", False)


def test_a_slow_lookup_delays_only_its_own_login(
    servers: dict[str, DovecotInstance],
    start_proxy: Callable[..., ProxyProcess],
    auth_service: AuthService,
) -> None:
    auth_service.delay_for["slow"] = 2.0
    proxy = routed_proxy(start_proxy, None, route_http_url=auth_service.url)
    slow_result: list[Any] = []

    def slow_login() -> None:
        started = time.monotonic()
        client, replies = login(proxy.host, proxy.port, "slow", "pw")
        client.close()
        slow_result.append((time.monotonic() - started, replies[-1]))

    thread = threading.Thread(target=slow_login)
    thread.start()
    assert wait_until(lambda: any(r.get("Auth-User") == "slow" for r in auth_service.requests))
    started = time.monotonic()
    assert visit(proxy, "alice") == ("A", False)
    assert time.monotonic() - started < 1.0, "alice waited for slow's lookup"
    thread.join(timeout=10)
    elapsed, reply = slow_result[0]
    assert elapsed >= 1.9 and reply.startswith(b"L1 NO [AUTHENTICATIONFAILED]")  # no such user


def test_an_auth_service_down_gives_unavailable_and_recovers(
    servers: dict[str, DovecotInstance],
    start_proxy: Callable[..., ProxyProcess],
    auth_service: AuthService,
) -> None:
    proxy = routed_proxy(start_proxy, None, route_http_url=auth_service.url, route_cache_ttl=0)
    assert visit(proxy, "alice") == ("A", False)
    auth_service.stop()
    started = time.monotonic()
    client, replies = login(proxy.host, proxy.port, "bob", password("bob"))
    client.close()
    assert replies == [b"L1 NO [UNAVAILABLE] Cannot find your IMAP server now, try again later\r\n"]
    assert time.monotonic() - started < 3.5  # route_lookup_timeout 3
    assert "route lookup for 'bob' failed: auth service" in proxy.log_text()
    auth_service.restart()
    assert visit(proxy, "bob") == ("B", False)


def test_a_hung_auth_service_times_out_with_unavailable(
    servers: dict[str, DovecotInstance], start_proxy: Callable[..., ProxyProcess]
) -> None:
    """A service that accepts and never answers: NO [UNAVAILABLE] after route_lookup_timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/auth"
        proxy = routed_proxy(start_proxy, servers["A"], route_http_url=url, route_lookup_timeout=1)
        started = time.monotonic()
        client, replies = login(proxy.host, proxy.port, "alice", password("alice"))
        client.close()
    elapsed = time.monotonic() - started
    assert replies[-1].startswith(b"L1 NO [UNAVAILABLE]") and 0.9 < elapsed < 2.5, elapsed
    assert "no answer in 1 s" in proxy.log_text()  # never the default server silently


# -- health ---------------------------------------------------------------------------------------


def dovecot_pids(instance: DovecotInstance) -> list[int]:
    """The instance's master and every process it started."""
    assert instance.process is not None
    marker = f"dovecot-{instance.instance_name}/".encode()
    pids = [instance.process.pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(marker):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def servers_file_states(proxy: ProxyProcess) -> dict[str, State]:
    """What pimpstat's servers view shows, from the file beside the statistics file."""
    text = Path(servers_path(str(proxy.stat_path))).read_text()
    return {line.address: line.state for line in parse_servers(text)}


def timed_login(proxy: ProxyProcess, user: str) -> tuple[float, bytes]:
    started = time.monotonic()
    client, replies = login(proxy.host, proxy.port, user, password(user))
    client.close()
    return time.monotonic() - started, replies[-1]


def test_a_hung_server_is_marked_down_fails_fast_for_its_users_only_and_comes_back(
    servers: dict[str, DovecotInstance],
    start_proxy: Callable[..., ProxyProcess],
    files: Path,
    report_figure: Callable[[str], None],
) -> None:
    a, b = servers["A"], servers["B"]
    routes = write_map(files / "routes", [f"bob {at(b)}", f"* {at(a)}"])
    proxy = routed_proxy(
        start_proxy,
        None,
        route_map=routes,
        server_response_timeout=2,
        server_connect_timeout=10,
        server_down_after=2,
        server_down_max_backoff=2,
        cache_expiration_time=0,
    )
    assert visit(proxy, "bob") == ("B", False)
    pids = dovecot_pids(b)
    signal_all(pids, signal.SIGSTOP)  # a hung server: it accepts (the kernel does), says nothing
    try:
        for _ in range(2):
            elapsed, reply = timed_login(proxy, "bob")
            assert reply.startswith(b"L1 NO [UNAVAILABLE]") and elapsed >= 1.9, (elapsed, reply)
        elapsed, reply = timed_login(proxy, "bob")
        assert reply == b"L1 NO [UNAVAILABLE] IMAP server unavailable, try again later\r\n"
        assert elapsed < 0.5, elapsed  # marked down: no wait for the 2 s (or 10 s) time-outs
        report_figure(
            f"health: a login to a server marked down answered in {elapsed * 1000:.0f} ms "
            "(server_response_timeout 2 s, server_connect_timeout 10 s)"
        )
        assert visit(proxy, "alice") == ("A", False)  # the other server's users see nothing
        servers_view = b"".join(admin(proxy, b"XPROXY_SERVERS"))
        assert f"* XPROXY_SERVERS {at(b)} {at(b)} down ".encode() in servers_view, servers_view
        assert f"* XPROXY_SERVERS {at(a)} {at(a)} up 0 0\r\n".encode() in servers_view
        assert servers_file_states(proxy) == {at(a): State.UP, at(b): State.DOWN}
    finally:
        signal_all(pids, signal.SIGCONT)
    assert wait_until(lambda: "is up again" in proxy.log_text(), timeout=15), proxy.log_text()
    assert visit(proxy, "bob") == ("B", False)  # back without a restart
    assert servers_file_states(proxy) == {at(a): State.UP, at(b): State.UP}  # pimpstat's view
    log = proxy.log_text()
    assert log.count(f"IMAP server {at(b)} ({at(b)}) is down after 2 failures") == 1, log
    assert log.count(f"IMAP server {at(b)} ({at(b)}) is up again") == 1


def test_a_stopped_server_is_marked_down_and_comes_back_when_restarted(
    servers: dict[str, DovecotInstance], start_proxy: Callable[..., ProxyProcess], files: Path
) -> None:
    a = servers["A"]
    with running_dovecot({"erin": "pw-erin"}, prefix="ipx-route-c-") as c:
        c.deliver("erin", make_message("erin on C"))
        routes = write_map(files / "routes", [f"erin {at(c)}", f"* {at(a)}"])
        proxy = routed_proxy(start_proxy, None, route_map=routes, server_down_after=1)
        c.stop()
        client, replies = login(proxy.host, proxy.port, "erin", "pw-erin")
        client.close()
        assert replies[-1].startswith(b"L1 NO [UNAVAILABLE]")
        proxy.wait_for_log(f"IMAP server {at(c)} ({at(c)}) is down")
        assert visit(proxy, "alice") == ("A", False)
        c.start()  # the same port
        assert wait_until(lambda: "is up again" in proxy.log_text(), timeout=15)
        client, replies = logged_in(proxy.host, proxy.port, "erin", "pw-erin")
        client.close()


def test_metrics_show_each_servers_state_and_sessions(
    servers: dict[str, DovecotInstance], start_proxy: Callable[..., ProxyProcess], files: Path
) -> None:
    from tests.test_metrics import promtool, samples, scrape_text, value

    a, b = servers["A"], servers["B"]
    routes = write_map(files / "routes", [f"alice {at(a)}", f"bob {at(b)}"])
    port = free_port()
    proxy = routed_proxy(start_proxy, None, route_map=routes, metrics_listen=f"127.0.0.1:{port}")
    proxy.wait_for_log("metrics: http://127.0.0.1:")
    assert visit(proxy, "alice") == ("A", False)
    assert visit(proxy, "bob") == ("B", False)
    held, _ = logged_in(proxy.host, proxy.port, "bob", password("bob"))  # active on B
    status, text = scrape_text(port)
    held.close()
    assert status == 200
    found = samples(text)
    assert value(found, "imapproxy_server_sessions_by_server", server=at(a), state="cached") == 1
    assert value(found, "imapproxy_server_sessions_by_server", server=at(b), state="active") == 1
    up = {labels: v for (name, labels), v in found.items() if name == "imapproxy_server_up"}
    assert up and set(up.values()) == {1.0}, up
    assert {dict(labels)["server"] for labels in up} == {at(a), at(b)}
    assert "alice" not in text and "bob" not in text  # servers as labels, never users
    promtool(text)

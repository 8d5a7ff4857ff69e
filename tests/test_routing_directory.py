"""Routes from a real OpenLDAP (slapd) and a real PostgreSQL, to the two real Dovecots of the
``servers`` fixture: each user lands on the server its entry or row names, hostile names are
only ever values, and a directory or database that stops gives NO [UNAVAILABLE] within the
lookup time-out and serves again once it is back."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.client import RawClient, login
from tests.support.dovecot import DovecotInstance
from tests.support.pki import write_pki
from tests.support.postgres import Postgres, running_postgres
from tests.support.proxy import ProxyProcess
from tests.support.routing import at, password, routed_proxy, visit
from tests.support.slapd import PEOPLE_DN, Slapd, running_slapd

HOSTILE = [b"*", b")(", b"\\", b"'; --", b"*)(uid=*", b"alice)(uid=*", b"%s%n", b"a" * 250]
UNAVAILABLE = b"L1 NO [UNAVAILABLE] Cannot find your IMAP server now, try again later\r\n"
NO_ROUTE = b"L1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"


def hostile_login(proxy: ProxyProcess, name: bytes) -> list[bytes]:
    with RawClient(proxy.host, proxy.port) as client:
        client.send(b"L1 LOGIN {%d+}\r\n%s {2+}\r\npw\r\n" % (len(name), name))
        return client.read_until_tagged(b"L1")


def timed_login(proxy: ProxyProcess, user: str) -> tuple[float, list[bytes]]:
    started = time.monotonic()
    client, replies = login(proxy.host, proxy.port, user, password(user))
    client.close()
    return time.monotonic() - started, replies


# -- LDAP ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slapd(servers: dict[str, DovecotInstance]) -> Iterator[Slapd]:
    a, b = servers["A"], servers["B"]
    with running_slapd() as directory:
        # carol has an entry without mailHost: no route; dave is not in the directory
        directory.add_people({"alice": at(a), "bob": at(b), "carol": None})
        yield directory


def ldap_proxy(
    start_proxy: Callable[..., ProxyProcess], slapd: Slapd, **settings: Any
) -> ProxyProcess:
    return routed_proxy(
        start_proxy,
        None,
        route_ldap_uri=slapd.uri,
        route_ldap_base=PEOPLE_DN,
        route_ldap_filter="(&(objectClass=inetOrgPerson)(uid=%u))",
        route_ldap_attribute="mailHost",
        auth_failure_delay=0,
        **settings,
    )


def test_ldap_routes_each_user_to_the_server_of_its_entry(
    servers: dict[str, DovecotInstance], start_proxy: Callable[..., ProxyProcess], slapd: Slapd
) -> None:
    proxy = ldap_proxy(start_proxy, slapd)
    assert visit(proxy, "alice") == ("A", False)
    assert visit(proxy, "bob") == ("B", False)
    assert visit(proxy, "bob") == ("B", True)
    for user in ("carol", "dave"):  # no mailHost, no entry: no route, no default server
        assert timed_login(proxy, user)[1] == [NO_ROUTE]


def test_ldap_hostile_names_are_only_values(
    servers: dict[str, DovecotInstance], start_proxy: Callable[..., ProxyProcess], slapd: Slapd
) -> None:
    """Unescaped, "*" would match every entry (and "alice)(uid=*" alice's): both would give a
    route or an ambiguity; escaped (RFC 4515) they match nothing."""
    proxy = ldap_proxy(start_proxy, slapd)
    for name in HOSTILE:
        assert hostile_login(proxy, name) == [NO_ROUTE], name
    assert visit(proxy, "alice") == ("A", False)
    assert "Traceback" not in proxy.log_text()


def test_ldap_stopped_gives_unavailable_within_the_timeout_and_recovers(
    servers: dict[str, DovecotInstance], start_proxy: Callable[..., ProxyProcess], slapd: Slapd
) -> None:
    proxy = ldap_proxy(start_proxy, slapd, route_cache_ttl=0, route_lookup_timeout=2)
    assert visit(proxy, "alice") == ("A", False)
    slapd.stop()
    try:
        elapsed, replies = timed_login(proxy, "bob")
        assert replies == [UNAVAILABLE] and elapsed < 2.5, (elapsed, replies)
        assert "route lookup for 'bob' failed: LDAP" in proxy.log_text()
    finally:
        slapd.start()
    assert visit(proxy, "bob") == ("B", False)  # back: the kept connection is replaced


# -- PostgreSQL ------------------------------------------------------------------------------------

PG_QUERY = "SELECT host, port FROM routes WHERE login = %(user)s"


@pytest.fixture(scope="module")
def postgres(servers: dict[str, DovecotInstance]) -> Iterator[Postgres]:
    a, b = servers["A"], servers["B"]
    with running_postgres() as database:
        with database.superuser("routes") as db:
            db.execute("CREATE TABLE routes (login text PRIMARY KEY, host text, port integer)")
            db.execute("GRANT SELECT ON routes TO imapproxy")
            db.execute(
                "INSERT INTO routes VALUES (%s, %s, %s), (%s, %s, %s)",
                ("alice", a.host, a.port, "bob", b.host, b.port),
            )
        yield database


def pg_proxy(
    start_proxy: Callable[..., ProxyProcess], postgres: Postgres, **settings: Any
) -> ProxyProcess:
    return routed_proxy(
        start_proxy,
        None,
        route_sql_url=postgres.url(),
        route_sql_query=PG_QUERY,
        auth_failure_delay=0,
        **settings,
    )


def test_postgresql_routes_each_user_to_the_server_of_its_row(
    servers: dict[str, DovecotInstance],
    start_proxy: Callable[..., ProxyProcess],
    postgres: Postgres,
) -> None:
    proxy = pg_proxy(start_proxy, postgres)
    assert visit(proxy, "alice") == ("A", False)
    assert visit(proxy, "bob") == ("B", False)
    assert visit(proxy, "alice") == ("A", True)
    assert timed_login(proxy, "dave")[1] == [NO_ROUTE]
    assert "pg-proxy-pw" not in proxy.log_text()


def test_postgresql_hostile_names_are_only_parameters(
    servers: dict[str, DovecotInstance],
    start_proxy: Callable[..., ProxyProcess],
    postgres: Postgres,
) -> None:
    proxy = pg_proxy(start_proxy, postgres)
    for name in [*HOSTILE, b"x' OR '1'='1", b"'; DROP TABLE routes; --", b"\xc3\xa9\xff"]:
        assert hostile_login(proxy, name) == [NO_ROUTE], name
    with postgres.superuser("routes") as db:
        assert db.execute("SELECT count(*) FROM routes").fetchone() == (2,)
    assert visit(proxy, "bob") == ("B", False)
    assert "Traceback" not in proxy.log_text()


def test_postgresql_stopped_gives_unavailable_within_the_timeout_and_recovers(
    servers: dict[str, DovecotInstance],
    start_proxy: Callable[..., ProxyProcess],
    postgres: Postgres,
) -> None:
    proxy = pg_proxy(start_proxy, postgres, route_cache_ttl=0, route_lookup_timeout=2)
    assert visit(proxy, "alice") == ("A", False)
    postgres.stop()
    try:
        elapsed, replies = timed_login(proxy, "bob")
        assert replies == [UNAVAILABLE] and elapsed < 2.5, (elapsed, replies)
        assert "route lookup for 'bob' failed: postgresql" in proxy.log_text()
    finally:
        postgres.start()
    assert visit(proxy, "bob") == ("B", False)
    log = proxy.log_text()
    assert "pg-proxy-pw" not in log and "imapproxy:********@127.0.0.1" in log


def test_ldaps_is_verified_against_the_configured_ca(
    servers: dict[str, DovecotInstance], start_proxy: Callable[..., ProxyProcess], files: Path
) -> None:
    """ldaps:// to a slapd whose certificate (for 127.0.0.2) comes from our CA: routes; with a
    CA that did not sign it: NO [UNAVAILABLE], never an unverified answer."""
    pki = write_pki(files)
    with running_slapd(tls=(pki["server"], pki["key"])) as directory:
        directory.add_people({"alice": at(servers["A"])})
        for ca, expected in ((pki["ca"], "A"), (pki["other_ca"], None)):
            proxy = routed_proxy(
                start_proxy,
                None,
                route_ldap_uri=directory.tls_uri,
                route_ldap_base=PEOPLE_DN,
                route_ldap_filter="(uid=%u)",
                route_ldap_tls_ca_file=ca,
            )
            if expected:
                assert visit(proxy, "alice") == (expected, False)
            else:
                assert timed_login(proxy, "alice")[1] == [UNAVAILABLE]
                assert "route lookup for 'alice' failed: LDAP ldaps://127.0.0.2" in proxy.log_text()

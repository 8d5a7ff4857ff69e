"""Routes, the route map, the answer cache, LDAP filter escaping, health records (sans-I/O),
and the pure parts of the SQL and HTTP sources."""

from __future__ import annotations

from email.message import Message

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imapproxy.errors import ConfigError
from imapproxy.health import HealthBook, State
from imapproxy.route import (
    Route,
    RouteCache,
    RouteDenied,
    RouteError,
    RouteUnavailable,
    TLSMode,
    expand_filter,
    ldap_escape,
    make_route,
    parse_route_map,
)
from imapproxy.route_http import request_headers, route_from_answer
from imapproxy.route_sql import route_from_row
from imapproxy.router import lookup_name

MAP = """\
# routes
alice@example.com  mail1.example.com
alice              mail2.example.com:1143 tls=starttls
@example.com       [::1]:10143 destuser=shared connect_timeout=3   # trailing
@example.org       mail4 tls=implicit
*                  fallback.example.com
"""


def routes() -> object:
    return parse_route_map(MAP.splitlines(keepends=True), "routes")


@pytest.mark.parametrize(
    ("login", "expected"),
    [
        (b"alice@example.com", Route("mail1.example.com")),
        (b"ALICE@Example.COM", Route("mail1.example.com")),
        (b"alice@example.net", Route("mail2.example.com", 1143, TLSMode.STARTTLS)),
        (b"alice", Route("mail2.example.com", 1143, TLSMode.STARTTLS)),
        (b"bob@example.com", Route("::1", 10143, None, b"shared", 3)),
        (b"bob@example.org", Route("mail4", 993, TLSMode.IMPLICIT)),
        (b"bob", Route("fallback.example.com")),
        (b"\xff\xfe@example.com", Route("fallback.example.com")),
    ],
)
def test_most_specific_key_wins(login: bytes, expected: Route) -> None:
    assert routes().lookup(login) == expected  # type: ignore[attr-defined]


def test_no_star_no_route() -> None:
    table = parse_route_map(["alice h1\n"], "r")
    assert table.lookup(b"bob") is None and table.lookup(b"alice@x") == Route("h1")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("alice\n", "r:1: alice: expected KEY HOST[:PORT] [option=value]"),
        ("\n\nalice h:0\n", 'r:3: alice: expected a port number from 1 to 65535, got "0"'),
        (
            "alice h tls=maybe\n",
            'r:1: alice: tls: expected clear, starttls or implicit, got "maybe"',
        ),
        ("alice h color=red\n", 'r:1: alice: unknown option "color=red"'),
        ("a*b h\n", "r:1: a*b: a key is a login name, a bare name, @domain or *"),
        ("alice h\nALICE h2\n", "r:2: ALICE: a second route for this key"),
        ("alice h/x\n", "r:1: alice: host: not a host name or address"),
        ("alice [::1\n", "r:1: alice: bad bracketed address"),
        ("alice h connect_timeout=0\n", "r:1: alice: connect_timeout: expected a positive integer"),
    ],
)
def test_map_errors_name_file_and_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_route_map(text.splitlines(keepends=True), "r")
    assert str(raised.value).startswith(message)


def test_route_names_and_targets() -> None:
    route = Route("::1", 143, None, b"x")
    assert route.name == "[::1]:143" and route.target == Route("::1", 143)
    assert make_route("h", port=995, tls="clear") == Route("h", 995, TLSMode.CLEAR)
    with pytest.raises(RouteError):
        make_route("h", destuser="a\r\nb")


def test_cache_keeps_answers_for_ttl_only() -> None:
    cache = RouteCache(ttl=10, max_entries=2)
    cache.put("a", Route("h"), now=0)
    cache.put("b", None, now=0)
    assert cache.get("a", 9.9) == (True, Route("h")) and cache.get("b", 5) == (True, None)
    assert cache.get("a", 10) == (False, None) and len(cache) == 1
    cache.put("c", Route("c"), 11)
    cache.put("d", Route("d"), 11)  # bounded: the oldest goes
    assert cache.get("b", 11) == (False, None) and len(cache) == 2


def test_cache_ttl_zero_keeps_nothing() -> None:
    cache = RouteCache(ttl=0)
    cache.put("a", Route("h"), 0)
    assert cache.get("a", 0) == (False, None)


@pytest.mark.parametrize(
    ("name", "escaped"),
    [
        ("*", "\\2a"),
        (")(", "\\29\\28"),
        ("\\", "\\5c"),
        ("a\x00b", "a\\00b"),
        ("'; --", "'; --"),
        ("*)(uid=*))(|(uid=*", "\\2a\\29\\28uid=\\2a\\29\\29\\28|\\28uid=\\2a"),
        ("jörg", "j\\c3\\b6rg"),
    ],
)
def test_ldap_escape_rfc4515(name: str, escaped: str) -> None:
    assert ldap_escape(name) == escaped


def test_expand_filter() -> None:
    template = "(|(mail=%u)(&(uid=%n)(dc=%d))(x=100%%))"
    assert expand_filter(template, b"a*b@ex(ample)") == (
        "(|(mail=a\\2ab@ex\\28ample\\29)(&(uid=a\\2ab)(dc=ex\\28ample\\29))(x=100%))"
    )


@given(st.binary(max_size=300))
def test_expanded_filter_never_has_structure_from_the_name(name: bytes) -> None:
    expanded = expand_filter("(mail=%u)", name)
    inner = expanded[len("(mail=") : -1]
    assert not set(inner) & set("()*\x00") and all(" " <= c <= "~" for c in inner)


@given(st.binary(max_size=300))
def test_route_map_lookup_never_fails(name: bytes) -> None:
    assert routes().lookup(name) is not None  # type: ignore[attr-defined]


def test_lookup_name_refuses_what_no_source_knows() -> None:
    assert lookup_name(b"alice@example.com") == "alice@example.com"
    assert lookup_name(b"\xff") is None and lookup_name(b"a\x00b") is None
    assert lookup_name(b"a\tb") is None


# -- health --------------------------------------------------------------------------------------


def test_down_after_failures_in_a_row_then_probe_backoff_doubles_to_the_cap() -> None:
    book = HealthBook(down_after=3, max_backoff=4)
    assert book.failed("a", "s:1", "a:1", "refused", 0) is None
    book.succeeded("a", 0.5)  # a success in between: the count starts again
    assert book.failed("a", "s:1", "a:1", "refused", 1) is None
    assert book.failed("a", "s:1", "a:1", "refused", 1) is None
    assert book.usable("a")
    change = book.failed("a", "s:1", "a:1", "refused", 2)
    assert change is not None and change.state is State.DOWN and not book.usable("a")
    assert book.failed("a", "s:1", "a:1", "again", 2.1) is None  # logged once
    assert book.next_deadline() == 3.0 and book.due(2.9) == [] and book.due(3.0) == ["a"]
    book.probe_failed("a", "refused", 3)
    assert book.next_deadline() == 5.0
    book.probe_failed("a", "refused", 5)
    book.probe_failed("a", "refused", 9)
    assert book.next_deadline() == 13.0  # capped at 4
    up = book.succeeded("a", 13)
    assert up is not None and up.state is State.UP and book.usable("a")
    assert book.succeeded("a", 14) is None and book.next_deadline() is None
    assert book.usable("never-seen")


def test_records_listed_by_server() -> None:
    book = HealthBook(1, 60)
    book.failed("b", "s2:143", "127.0.0.2:143", "x", 0)
    book.record("a", "s1:143", "127.0.0.1:143")
    assert [(r.server, r.state) for r in book.records()] == [
        ("s1:143", State.UP),
        ("s2:143", State.DOWN),
    ]


# -- the sources' pure parts ---------------------------------------------------------------------


def test_sql_rows() -> None:
    assert route_from_row(["host", "port"], ("h", 1143)) == Route("h", 1143)
    assert route_from_row(["a", "b", "c"], ("h", None, "u")) == Route("h", 143, None, b"u")
    assert route_from_row(["port", "host"], (993, "h")) == Route("h", 993)
    assert route_from_row(["host"], None) is None and route_from_row(["host"], (None,)) is None
    with pytest.raises(RouteUnavailable):
        route_from_row(["host", "port"], ("h", 0))


def answer(**headers: str) -> Message:
    message = Message()
    for name, value in headers.items():
        message[name.replace("_", "-")] = value
    return message


def test_http_answers() -> None:
    ok = answer(Auth_Status="OK", Auth_Server="127.0.0.1", Auth_Port="1143", Auth_User="bob")
    assert route_from_answer(ok) == Route("127.0.0.1", 1143, None, b"bob")
    with pytest.raises(RouteDenied) as denied:
        route_from_answer(answer(Auth_Status="Invalid login\x07 or password", Auth_Wait="3"))
    assert (denied.value.text, denied.value.wait_s) == ("Invalid login or password", 3.0)
    with pytest.raises(RouteDenied) as denied:
        route_from_answer(answer(Auth_Wait="99999"))
    assert denied.value.wait_s == 30.0 and denied.value.text == "Authentication failed."
    with pytest.raises(RouteUnavailable):
        route_from_answer(answer(Auth_Status="OK"))


def test_http_request_escapes_as_nginx_and_sends_the_password_only_if_told() -> None:
    from imapproxy.route import RouteRequest

    request = RouteRequest("a b%c\u00e9", b"pw 1", "LOGIN", "127.0.0.1")
    headers = request_headers(request, send_password=False)
    assert headers["Auth-User"] == "a%20b%25c%C3%A9" and "Auth-Pass" not in headers
    assert request_headers(request, send_password=True)["Auth-Pass"] == "pw%201"
    assert "pw 1" not in repr(request) and headers["Auth-Method"] == "plain"
    auth_login = RouteRequest("a", b"p", "AUTH-LOGIN", "127.0.0.1")
    assert request_headers(auth_login, send_password=False)["Auth-Method"] == "login"


# -- the servers file, and pimpstat's servers view ------------------------------------------------


def test_servers_file_round_trip_skips_a_half_written_line() -> None:
    from imapproxy.health import format_servers, parse_servers

    book = HealthBook(1, 60)
    book.record("a", "imap1:143", "10.0.0.1:143")
    book.failed("b", "imap2:143", "10.0.0.2:143", "connect: [Errno 111]\tConnection refused", 50)
    text = format_servers(book.records(), wall_now=1_800_000_100.0, now=100.0).decode()
    lines = parse_servers(text + "imap3:143\t10.0.0.3:1")  # a write caught half-way
    assert [(x.server, x.state, x.failures, x.changed_unix) for x in lines] == [
        ("imap1:143", State.UP, 0, 0),
        ("imap2:143", State.DOWN, 1, 1_800_000_050),
    ]
    assert lines[1].last_error == "connect: [Errno 111] Connection refused"


def test_pimpstat_servers_view() -> None:
    import time

    from imapproxy.health import ServerLine
    from pimpstat import view

    lines = [
        ServerLine("imap1:143", "10.0.0.1:143", State.UP, 0, 0, ""),
        ServerLine("imap2:143", "10.0.0.2:143", State.DOWN, 3, 1_800_000_050, "no greeting"),
    ]
    rows = view.server_rows(lines, "/run/pimpstats.servers", time.gmtime)
    text = [(r.label, r.value) for r in rows]
    assert ("imap1:143 (10.0.0.1:143):", "UP") in text
    assert ("imap2:143 (10.0.0.2:143):", "DOWN") in text
    assert ("  failures in a row:", "3") in text and ("  last error:", "no greeting") in text
    assert ("  since:", "Fri Jan 15 08:00:50 2027") in text
    missing = view.server_rows(None, "/run/pimpstats.servers", time.gmtime)
    assert ("problem:", "cannot read it") in [(r.label, r.value) for r in missing]
    assert "servers" in view.VIEWS


# -- hostile input to the parsers: only our own errors -------------------------------------------


@given(st.lists(st.text(max_size=80), max_size=8))
def test_any_route_map_text_parses_or_is_a_config_error(lines: list[str]) -> None:
    try:
        table = parse_route_map([line + "\n" for line in lines], "r")
    except ConfigError as error:
        assert str(error).startswith("r:")
    else:
        for route in table.entries.values():
            assert 1 <= route.port <= 65535 and route.host


@given(
    st.dictionaries(
        st.sampled_from(["Auth-Status", "Auth-Server", "Auth-Port", "Auth-User", "Auth-Wait"]),
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
    )
)
def test_any_auth_http_answer_is_a_route_or_our_error(headers: dict[str, str]) -> None:
    message = Message()
    for name, value in headers.items():
        message[name] = value
    try:
        route = route_from_answer(message)
    except RouteDenied as denied:
        assert 0 <= denied.wait_s <= 30 and all(" " <= c <= "~" for c in denied.text)
    except RouteUnavailable:
        pass
    else:
        assert route.host and 1 <= route.port <= 65535


@given(
    st.lists(
        st.one_of(st.none(), st.integers(), st.text(max_size=30), st.binary(max_size=10)),
        min_size=1,
        max_size=5,
    )
)
def test_any_sql_row_is_a_route_none_or_our_error(row: list[object]) -> None:
    try:
        route = route_from_row(
            ["host", "port", "destuser", "tls", "connect_timeout"][: len(row)], row
        )
    except RouteUnavailable:
        return
    assert route is None or (route.host and 1 <= route.port <= 65535)

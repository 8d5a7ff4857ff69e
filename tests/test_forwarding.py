"""The client's address to the server: the ID merged at login (no sockets; Dovecot's side is
in test_proxy_protocol.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from imapproxy.backend_login import BackendPolicy, login_dialogue
from imapproxy.forwarding import (
    MAX_ID_PAIRS,
    ClientOrigin,
    client_fields,
    id_fields,
    originating_ip,
    unmapped,
)
from tests.test_backend_login import GREETING, LOGGED_IN, creds, drive

ORIGIN = ClientOrigin("192.0.2.7", 56324, "198.51.100.1", 143, "sess1", trusted=False)
TRUSTED = ClientOrigin("127.0.0.1", 40000, "127.0.0.1", 143, "sess2", trusted=True)
OURS = (
    b"x-originating-ip",
    b"192.0.2.7",
    b"x-originating-port",
    b"56324",
    b"x-connected-ip",
    b"198.51.100.1",
    b"x-connected-port",
    b"143",
    b"x-session-id",
    b"sess1",
    b"x-proxy-ttl",
    b"5",
)
FORGED = (b"X-Originating-IP", b"6.6.6.6", b"x-session-id", b"evil", b"x-forward-user", b"root")
ROUNDCUBE = (b"name", b"Roundcube", b"x-originating-ip", b"203.0.113.9")


def test_without_a_client_id_the_fields_are_ours() -> None:
    assert id_fields(ORIGIN, None) == OURS


def test_the_clients_own_fields_follow_ours() -> None:
    assert id_fields(ORIGIN, (b"name", b"webmail", b"version", None)) == (
        *OURS,
        b"name",
        b"webmail",
        b"version",
        None,
    )


def test_an_untrusted_clients_forwarding_fields_are_dropped_whatever_their_case() -> None:
    assert id_fields(ORIGIN, (b"name", b"x", *FORGED)) == (*OURS, b"name", b"x")
    assert client_fields(ORIGIN, (b"name", b"x", *FORGED)) == (b"name", b"x")
    assert client_fields(ORIGIN, FORGED) is None
    assert originating_ip(ORIGIN, FORGED) == "192.0.2.7"


def test_a_trusted_webmail_gives_its_users_address_without_our_port() -> None:
    fields = id_fields(TRUSTED, ROUNDCUBE)
    pairs = dict(zip(fields[::2], fields[1::2], strict=True))
    assert pairs[b"x-originating-ip"] == b"203.0.113.9"
    assert b"x-originating-port" not in pairs  # ours would be the webmail's, not the browser's
    assert pairs[b"x-connected-ip"] == b"127.0.0.1" and pairs[b"x-session-id"] == b"sess2"
    assert pairs[b"name"] == b"Roundcube"
    assert originating_ip(TRUSTED, ROUNDCUBE) == "203.0.113.9"
    assert client_fields(TRUSTED, ROUNDCUBE) == ROUNDCUBE


def test_a_trusted_client_cannot_set_the_proxys_own_fields() -> None:
    fields = id_fields(TRUSTED, (b"x-session-id", b"theirs", b"x-proxy-ttl", b"99"))
    assert fields.count(b"x-session-id") == 1 and b"theirs" not in fields and b"99" not in fields
    alone = id_fields(TRUSTED, (b"x-originating-port", b"1"))  # a port without an address
    assert dict(zip(alone[::2], alone[1::2], strict=True))[b"x-originating-port"] == b"40000"


def test_a_trusted_clients_empty_address_is_not_believed() -> None:
    for empty in (None, b""):
        fields = id_fields(TRUSTED, (b"x-originating-ip", empty))
        pairs = dict(zip(fields[::2], fields[1::2], strict=True))
        assert pairs[b"x-originating-ip"] == b"127.0.0.1" and pairs[b"x-originating-port"]
        assert originating_ip(TRUSTED, (b"x-originating-ip", empty)) == "127.0.0.1"


def test_no_more_than_30_pairs() -> None:
    many = tuple(b for n in range(40) for b in (b"k%d" % n, b"v"))
    fields = id_fields(ORIGIN, many)
    assert len(fields) == 2 * MAX_ID_PAIRS and fields[: len(OURS)] == OURS


@given(st.lists(st.tuples(st.binary(max_size=20), st.none() | st.binary(max_size=20))))
def test_an_untrusted_client_never_sets_a_forwarding_field(
    pairs: list[tuple[bytes, bytes | None]],
) -> None:
    client = tuple(item for pair in pairs for item in pair) or None
    fields = id_fields(ORIGIN, client)
    keys = [k.lower() for k in fields[::2] if k is not None]
    assert fields[: len(OURS)] == OURS
    assert all(not k.startswith(b"x-originating") for k in keys[6:])
    assert keys.count(b"x-session-id") == 1 and keys.count(b"x-proxy-ttl") == 1


def test_login_dialogue_sends_the_merged_id_when_the_server_offers_id() -> None:
    policy = BackendPolicy(forward_client_address=True)
    sent, _ = drive(
        login_dialogue(creds(), policy, (b"name", b"webmail", *FORGED), ORIGIN),
        [GREETING, b"* ID NIL\r\nI0001 OK\r\n", LOGGED_IN],
    )
    assert sent[0] == (
        b'I0001 ID ("x-originating-ip" "192.0.2.7" "x-originating-port" "56324" '
        b'"x-connected-ip" "198.51.100.1" "x-connected-port" "143" "x-session-id" "sess1" '
        b'"x-proxy-ttl" "5" "name" "webmail")\r\n'
    )
    assert sent[1].startswith(b"A0001 LOGIN")


def test_no_id_of_ours_to_a_server_without_id_and_forwarding_off_strips_forgeries() -> None:
    no_id = b"* OK [CAPABILITY IMAP4rev1 LITERAL+] hi\r\n"
    on = BackendPolicy(forward_client_address=True)
    sent, _ = drive(login_dialogue(creds(), on, None, ORIGIN), [no_id, LOGGED_IN])
    assert [s[:11] for s in sent] == [b"A0001 LOGIN"]
    off = BackendPolicy(forward_client_address=False)
    sent, _ = drive(
        login_dialogue(creds(), off, (b"name", b"w", *FORGED), ORIGIN),
        [GREETING, b"I0001 OK\r\n", LOGGED_IN],
    )
    assert sent[0] == b'I0001 ID ("name" "w")\r\n'
    sent, _ = drive(login_dialogue(creds(), off, FORGED, ORIGIN), [GREETING, LOGGED_IN])
    assert [s[:11] for s in sent] == [b"A0001 LOGIN"]


def test_a_dual_stack_listeners_view_of_an_ipv4_client_is_its_ipv4_address() -> None:
    assert unmapped("::ffff:192.0.2.7") == "192.0.2.7"
    assert unmapped("2001:db8::7") == "2001:db8::7" and unmapped("192.0.2.7") == "192.0.2.7"
    assert unmapped("::ffff:1.2.3.x") == "::ffff:1.2.3.x"

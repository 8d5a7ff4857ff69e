"""The pre-login state machine as playbooks: bytes in, actions out, no sockets."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imapproxy.credentials import Credentials
from imapproxy.errors import ProxyError
from imapproxy.protocol.framing import NEED_DATA
from imapproxy.session import (
    MAX_BAD_COMMANDS,
    AdminRequested,
    Closed,
    LoginRequested,
    PreLoginPolicy,
    PreLoginSession,
    Reply,
)

CAPS = b"* CAPABILITY IMAP4rev1 AUTH=PLAIN XIMAPPROXY"


def session(admin: bool = False) -> PreLoginSession:
    return PreLoginSession(PreLoginPolicy(capabilities=lambda: CAPS, admin_enabled=lambda: admin))


def play(s: PreLoginSession, data: bytes) -> list[object]:
    s.receive_data(data)
    out: list[object] = []
    while (action := s.next_action()) is not NEED_DATA:
        out.append(action)
    return out


def replies(actions: list[object]) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, Reply))


def login(actions: list[object]) -> LoginRequested:
    found = [a for a in actions if isinstance(a, LoginRequested)]
    assert len(found) == 1, actions
    return found[0]


def test_capability_noop_logout() -> None:
    s = session()
    out = play(s, b"a CAPABILITY\r\nb NOOP\r\nc LOGOUT\r\nd NOOP\r\n")
    assert replies(out) == (
        CAPS + b"\r\na OK Completed\r\nb OK Completed\r\n"
        b"* BYE LOGOUT received\r\nc OK Completed\r\n"
    )
    assert out[-1] == Reply(b"* BYE LOGOUT received\r\nc OK Completed\r\n", close=True)


def test_login_forms_decode_to_the_same_credentials() -> None:
    expected = Credentials(b"alice", b'p "w\\d', "LOGIN")
    assert login(play(session(), b'a LOGIN alice "p \\"w\\\\d"\r\n')).credentials == expected
    s = session()
    assert replies(play(s, b"a LOGIN {5}\r\n")) == b"+ go ahead\r\n"
    assert replies(play(s, b"alice {6}\r\n")) == b"+ go ahead\r\n"
    assert login(play(s, b'p "w\\d\r\n')).credentials == expected
    assert (
        login(play(session(), b'a LOGIN {5+}\r\nalice {6+}\r\np "w\\d\r\n')).credentials == expected
    )


def test_empty_literals() -> None:
    s = session()
    assert replies(play(s, b"a LOGIN {0}\r\n")) == b"+ go ahead\r\n"
    assert replies(play(s, b" {0+}\r\n\r\n")) == b"a NO Invalid user name\r\n"
    assert replies(play(s, b"b CAPABILITY {0+}\r\n\r\n")) == b"b BAD Unexpected extra arguments\r\n"


def test_authenticate_plain_with_and_without_initial_response() -> None:
    message = base64.b64encode(b"\x00alice\x00secret")
    out = play(session(), b"a AUTHENTICATE PLAIN " + message + b"\r\n")
    assert login(out).credentials == Credentials(b"alice", b"secret", "PLAIN")
    s = session()
    assert replies(play(s, b"a AUTHENTICATE PLAIN\r\n")) == b"+ \r\n"
    assert login(play(s, message + b"\r\n")).tag == b"a"


def test_authenticate_login() -> None:
    s = session()
    assert replies(play(s, b"a AUTHENTICATE LOGIN\r\n")) == b"+ VXNlcm5hbWU6\r\n"
    assert replies(play(s, base64.b64encode(b"alice") + b"\r\n")) == b"+ UGFzc3dvcmQ6\r\n"
    out = play(s, base64.b64encode(b"secret") + b"\r\n")
    assert login(out).credentials == Credentials(b"alice", b"secret", "AUTH-LOGIN")


def test_authenticate_cancel_and_bad_base64() -> None:
    s = session()
    play(s, b"a AUTHENTICATE PLAIN\r\n")
    assert replies(play(s, b"*\r\n")) == b"a BAD AUTHENTICATE cancelled\r\n"
    play(s, b"b AUTHENTICATE PLAIN\r\n")
    assert replies(play(s, b"!!!\r\n")) == b"b BAD Invalid base64 in AUTHENTICATE response\r\n"
    assert replies(play(s, b"c NOOP\r\n")) == b"c OK Completed\r\n"


def test_authorization_identity_refused() -> None:
    message = base64.b64encode(b"bob\x00alice\x00secret")
    out = play(session(), b"a AUTHENTICATE PLAIN " + message + b"\r\n")
    assert replies(out) == b"a NO [AUTHORIZATIONFAILED] Authorization identity not allowed\r\n"


def test_other_mechanisms_and_commands() -> None:
    out = play(session(), b"a AUTHENTICATE CRAM-MD5\r\nb SELECT INBOX\r\nc STARTTLS\r\n")
    assert replies(out) == (
        b"a NO Unsupported authentication mechanism\r\n"
        b"b BAD Please login first\r\nc BAD Please login first\r\n"
    )


PRIVACY = b"NO [PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure connections\r\n"


@pytest.mark.parametrize(
    "command",
    [
        b"AUTHENTICATE PLAIN",
        b"AUTHENTICATE LOGIN",
        b"authenticate login " + base64.b64encode(b"alice"),
        b"AUTHENTICATE PLAIN " + base64.b64encode(b"\x00alice\x00secret"),
        b"AUTHENTICATE CRAM-MD5",
        b"LOGIN {5}",
        b"LOGIN alice {6}",
        b"LOGIN alice secret",
    ],
)
def test_tls_required_refuses_at_the_command_line(command: bytes) -> None:
    """client_tls_required, cleartext: refused before any "+", so no secret is invited."""
    secure = False
    s = PreLoginSession(PreLoginPolicy(capabilities=lambda: CAPS, login_allowed=lambda: secure))
    out = play(s, b"a " + command + b"\r\n")
    assert out == [Reply(b"a " + PRIVACY)]
    assert replies(play(s, b"b NOOP\r\n")) == b"b OK Completed\r\n"  # still in step
    secure = True  # after STARTTLS
    assert replies(play(s, b"c AUTHENTICATE LOGIN\r\n")) == b"+ VXNlcm5hbWU6\r\n"


def test_id_is_answered_and_kept_for_replay() -> None:
    s = session()
    out = play(s, b'a ID ("name" "Roundcube" "version" "1.6")\r\n')
    assert replies(out) == b'* ID ("name" "imapproxy")\r\na OK Completed\r\n'
    assert s.client_id == (b"name", b"Roundcube", b"version", b"1.6")
    play(s, b"b ID NIL\r\n")
    assert s.client_id is None
    assert replies(play(s, b'c ID ("odd")\r\n')) == b"c BAD Invalid ID parameter list\r\n"


def test_admin_commands_only_when_enabled() -> None:
    assert replies(play(session(), b"a XPROXY_VERSION\r\n")) == b"a BAD Unrecognized command\r\n"
    out = play(session(admin=True), b"a xproxy_trace alice\r\n")
    assert out == [AdminRequested(b"a", b"XPROXY_TRACE", b"alice")]


def test_too_big_literal() -> None:
    s = session()
    assert replies(play(s, b"a LOGIN {9000}\r\n")) == b"a BAD Literal too big\r\n"
    assert replies(play(s, b"b NOOP\r\n")) == b"b OK Completed\r\n"
    out = play(session(), b"a LOGIN {9000+}\r\n")
    assert out == [Reply(b"* BYE Literal too big\r\n", close=True)]


def test_long_line_is_fatal() -> None:
    out = play(session(), b"a NOOP " + b"x" * 20000)
    assert out == [Reply(b"* BYE Command line too long\r\n", close=True)]


def test_bad_command_budget() -> None:
    s = session()
    out = play(s, b"a FOO\r\n" * MAX_BAD_COMMANDS)
    assert out[-1] == Reply(
        b"a BAD Please login first\r\n* BYE Too many invalid IMAP commands\r\n", close=True
    )
    assert play(s, b"b NOOP\r\n") == []


def test_eof_is_closed() -> None:
    s = session()
    s.receive_data(b"")
    assert s.next_action() == Closed()


@given(st.binary(max_size=600), st.integers(min_value=1, max_value=40))
def test_hostile_input_gets_only_replies(data: bytes, step: int) -> None:
    s = session(admin=True)
    try:
        for i in range(0, len(data), step):
            for action in play(s, data[i : i + step]):
                assert isinstance(action, Reply | LoginRequested | AdminRequested | Closed)
    except ProxyError as error:  # pragma: no cover - the session turns errors into replies
        pytest.fail(f"error escaped: {error!r}")


@given(st.binary(max_size=600), st.integers(min_value=1, max_value=40))
def test_no_login_ever_without_tls_when_it_is_required(data: bytes, step: int) -> None:
    s = PreLoginSession(PreLoginPolicy(capabilities=lambda: CAPS, login_allowed=lambda: False))
    payload = b"a AUTHENTICATE PLAIN\r\nb LOGIN {5}\r\n" + data
    for i in range(0, len(payload), step):
        for action in play(s, payload[i : i + step]):
            assert not isinstance(action, LoginRequested)

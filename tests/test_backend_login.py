"""The backend login dialogue driven by scripted responses (no sockets)."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest

from imapproxy.backend_login import (
    READ,
    START_TLS,
    BackendPolicy,
    LoginResult,
    Send,
    check_shared_secret,
    login_dialogue,
)
from imapproxy.credentials import Credentials
from imapproxy.errors import BackendFailure, FailureKind
from imapproxy.protocol.framing import NEED_DATA
from imapproxy.protocol.response import Response, ResponseReader

GREETING = b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN] Dovecot ready.\r\n"
LOGGED_IN = b"A0001 OK [CAPABILITY IMAP4rev1 IDLE UNSELECT COMPRESS=DEFLATE] Logged in\r\n"


def responses(data: bytes) -> Iterator[Response]:
    reader = ResponseReader()
    reader.receive_data(data)
    while (r := reader.next_response()) is not NEED_DATA:
        assert isinstance(r, Response)
        yield r


def drive(dialogue: object, script: list[bytes]) -> tuple[list[bytes], LoginResult]:
    """Run the dialogue: each READ takes the next scripted response; return what was sent."""
    pending = [r for chunk in script for r in responses(chunk)]
    sent: list[bytes] = []
    value = None
    try:
        while True:
            step = dialogue.send(value)  # type: ignore[attr-defined]
            value = None
            if step is READ:
                value = pending.pop(0)
            elif isinstance(step, Send):
                sent.append(step.data)
            elif step is START_TLS:
                sent.append(b"<TLS>")
    except StopIteration as done:
        assert not pending, "unread responses"
        return sent, done.value


def creds(password: bytes = b"secret") -> Credentials:
    return Credentials(b"alice", password)


def test_plain_login_with_literal_plus_and_compress_filtered() -> None:
    sent, result = drive(
        login_dialogue(creds(b"se\r\ncret"), BackendPolicy(), None), [GREETING, LOGGED_IN]
    )
    assert sent == [b'A0001 LOGIN "alice" {8+}\r\nse\r\ncret\r\n']
    assert result.reply == b"OK [CAPABILITY IMAP4rev1 IDLE UNSELECT] Logged in"
    assert result.capabilities == (b"IMAP4rev1", b"IDLE", b"UNSELECT", b"COMPRESS=DEFLATE")
    assert result.greeting_text == b"Dovecot ready."


def test_synchronising_literal_waits_for_continuation() -> None:
    greeting = b"* OK [CAPABILITY IMAP4rev1] hi\r\n"
    sent, result = drive(
        login_dialogue(creds(b"a\x01\r\nb"), BackendPolicy(), None),
        [greeting, b"+ go\r\n", b"* CAPABILITY IMAP4rev1 X\r\nA0001 OK done\r\n"],
    )
    assert sent == [b'A0001 LOGIN "alice" {5}\r\n', b"a\x01\r\nb", b"\r\n"]
    assert result.untagged == (b"* CAPABILITY IMAP4rev1 X\r\n",)
    assert result.capabilities == (b"IMAP4rev1", b"X")


def test_capability_asked_when_greeting_lacks_it_and_id_and_preauth() -> None:
    policy = BackendPolicy(preauth_command=b'ID ("GUID" "1")')
    sent, _ = drive(
        login_dialogue(creds(), policy, (b"name", b"webmail")),
        [
            b"* OK ready\r\n",
            b"* CAPABILITY IMAP4rev1\r\nC0001 OK\r\n",
            b"* ID NIL\r\nI0001 OK\r\n",
            b"P0001 OK\r\n",
            b"A0001 OK Logged in\r\n",
        ],
    )
    assert sent == [
        b"C0001 CAPABILITY\r\n",
        b'I0001 ID ("name" "webmail")\r\n',
        b'P0001 ID ("GUID" "1")\r\n',
        b'A0001 LOGIN "alice" "secret"\r\n',
    ]


def test_rejected_login_carries_backends_reply() -> None:
    with pytest.raises(BackendFailure) as raised:
        drive(
            login_dialogue(creds(), BackendPolicy(), None),
            [GREETING, b"A0001 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"],
        )
    assert raised.value.kind is FailureKind.AUTH_REJECTED
    assert raised.value.response(b"x") == b"x NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"


def test_sasl_plain_and_static_identity() -> None:
    sent, _ = drive(
        login_dialogue(creds(), BackendPolicy(sasl_plain=True), None),
        [GREETING, b"A0001 OK in\r\n"],
    )
    assert sent == [b"A0001 AUTHENTICATE PLAIN " + base64.b64encode(b"\0alice\0secret") + b"\r\n"]
    policy = BackendPolicy(static_identity=(b"master", b"mpw"))
    sent, _ = drive(
        login_dialogue(creds(), policy, None),
        [b"* OK [CAPABILITY IMAP4rev1] hi\r\n", b"+ \r\n", b"A0001 OK in\r\n"],
    )
    assert sent == [
        b"A0001 AUTHENTICATE PLAIN\r\n",
        base64.b64encode(b"alice\0master\0mpw") + b"\r\n",
    ]


def test_static_identity_needs_the_shared_secret() -> None:
    policy = BackendPolicy(static_identity=(b"master", b"mpw"), shared_secret=b"s3cret")
    check_shared_secret(Credentials(b"alice", b"s3cret"), policy)
    with pytest.raises(BackendFailure) as raised:
        check_shared_secret(Credentials(b"alice", b"wrong"), policy)
    assert raised.value.response(b"a") == b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    check_shared_secret(Credentials(b"alice", b"anything"), BackendPolicy())  # not in that mode


@pytest.mark.parametrize(
    ("greeting", "kind"),
    [
        (b"* BYE Too many connections\r\n", FailureKind.CONNECT),
        (b"* PREAUTH welcome\r\n", FailureKind.PROTOCOL),
        (b"garbage here\r\n", FailureKind.PROTOCOL),
    ],
)
def test_bad_greetings(greeting: bytes, kind: FailureKind) -> None:
    with pytest.raises(BackendFailure) as raised:
        drive(login_dialogue(creds(), BackendPolicy(), None), [greeting])
    assert raised.value.kind is kind


def test_logindisabled_without_tls_refuses_to_send_password() -> None:
    greeting = b"* OK [CAPABILITY IMAP4rev1 LOGINDISABLED] hi\r\n"
    with pytest.raises(BackendFailure) as raised:
        drive(login_dialogue(creds(), BackendPolicy(), None), [greeting])
    assert raised.value.kind is FailureKind.TLS
    assert "refusing to send a password in clear" in raised.value.detail


def test_starttls_then_capabilities_again() -> None:
    policy = BackendPolicy(force_tls=True, tls_available=True)
    sent, result = drive(
        login_dialogue(creds(), policy, None),
        [
            b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] hi\r\n",
            b"S0001 OK go\r\n",
            b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nC0002 OK\r\n",
            b"A0001 OK in\r\n",
        ],
    )
    assert sent == [
        b"S0001 STARTTLS\r\n",
        b"<TLS>",
        b"C0002 CAPABILITY\r\n",
        b'A0001 LOGIN "alice" "secret"\r\n',
    ]
    assert result.prelogin_capabilities == (b"IMAP4rev1", b"AUTH=PLAIN")

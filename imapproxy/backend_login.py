"""Opening a backend session: greeting, CAPABILITY, STARTTLS, ID, preauth_command, login.

Sans-I/O, as a generator the I/O layer drives (``backend.open_session``). The dialogue yields
steps and receives their results:

* ``Send(data)``: write these bytes; receives ``None``;
* ``READ``: receives the next ``Response`` from the backend;
* ``START_TLS``: do the TLS handshake on the connection; receives ``None``.

It returns a ``LoginResult`` or raises ``BackendFailure``. The credentials are re-encoded from
their decoded values (``grammar.build_command``), never copied from the client's text.
Order, as up-imapproxy's (``Get_Server_conn``): greeting, STARTTLS when forced or when the
backend says LOGINDISABLED, the client's ID (with the client's address: ``forwarding``),
``preauth_command``, then the login in one of
three modes: LOGIN, ``AUTHENTICATE PLAIN`` (``auth_sasl_mech plain``, with SASL-IR when the
backend has it), or the static identity of ``auth_sasl_plain_username`` (master user).
"""

from __future__ import annotations

import functools
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TypeAlias, TypeVar

from imapproxy import forwarding
from imapproxy.credentials import Credentials, same_digest
from imapproxy.errors import BackendFailure, FailureKind
from imapproxy.forwarding import ClientOrigin, IdFields
from imapproxy.protocol import capability, sasl
from imapproxy.protocol.framing import Marker
from imapproxy.protocol.grammar import build_command, encode_string_list
from imapproxy.protocol.response import Response


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes


READ = Marker("READ")
START_TLS = Marker("START_TLS")

Step = Send | Marker
T = TypeVar("T")
Steps: TypeAlias = Generator[Step, Response | None, T]
Exchange: TypeAlias = tuple[list[Response], Response]  # untagged responses, tagged completion


@dataclass(frozen=True)
class BackendPolicy:
    """The settings that shape a backend login (from the configuration)."""

    force_tls: bool = False
    tls_available: bool = False
    preauth_command: bytes | None = None
    sasl_plain: bool = False  # auth_sasl_mech plain
    static_identity: tuple[bytes, bytes] | None = field(default=None, repr=False)
    shared_secret: bytes | None = field(default=None, repr=False)  # with static_identity
    forward_client_address: bool = False


@dataclass(frozen=True)
class LoginResult:
    greeting_text: bytes  # the backend greeting's text, after "* OK [...] "
    prelogin_capabilities: tuple[bytes, ...]
    reply: bytes  # the tagged reply without tag: "OK [CAPABILITY ...] Logged in"
    untagged: tuple[bytes, ...]  # untagged CAPABILITY responses sent during the login (raw)
    capabilities: tuple[bytes, ...]  # post-login capabilities, when the backend said them

    @functools.cached_property
    def capability_set(self) -> frozenset[bytes]:
        """The post-login capabilities, upper-cased, for quick membership tests."""
        return frozenset(cap.upper() for cap in self.capabilities)


def _failure(kind: FailureKind, detail: str, reply: bytes | None = None) -> BackendFailure:
    return BackendFailure(kind, detail, reply)


def command(wire: bytes, tag: bytes) -> Steps[Exchange]:
    """Send a one-line command; return its untagged responses and its tagged completion."""
    yield Send(wire)
    return (yield from read_until_tagged(tag))


def read_until_tagged(tag: bytes) -> Steps[Exchange]:
    untagged: list[Response] = []
    while True:
        response = yield READ
        assert isinstance(response, Response)
        if response.tag == tag:
            return untagged, response
        if response.tag == b"*":
            if response.word == b"BYE":
                raise _failure(FailureKind.PROTOCOL, "server said BYE: " + _text(response))
            untagged.append(response)
        elif response.tag != b"+":
            raise _failure(FailureKind.PROTOCOL, "unexpected tag in server response")


def _text(response: Response) -> str:
    return response.status_text.decode("utf-8", "replace")[:200]


def greeting(policy: BackendPolicy) -> Steps[tuple[bytes, tuple[bytes, ...]]]:
    """Read the greeting, get the capabilities, STARTTLS when needed; return text and list."""
    response = yield READ
    assert isinstance(response, Response)
    if response.tag != b"*" or response.word != b"OK":
        if response.word == b"BYE":
            raise _failure(FailureKind.CONNECT, "server refused connection: " + _text(response))
        raise _failure(FailureKind.PROTOCOL, "unexpected greeting: " + _text(response))
    caps = capability.from_response_code(response.code)
    text = response.text.split(b"] ", 1)[-1] if response.code is not None else response.text
    if caps is None:
        caps = yield from capabilities_of(b"C0001")
    if policy.force_tls or capability.has(caps, b"LOGINDISABLED"):
        caps = yield from starttls(policy, caps)
    return text, caps


def capabilities_of(tag: bytes) -> Steps[tuple[bytes, ...]]:
    untagged, done = yield from command(tag + b" CAPABILITY\r\n", tag)
    if done.word != b"OK":
        raise _failure(FailureKind.PROTOCOL, "CAPABILITY failed: " + _text(done))
    for response in untagged:
        if response.word == b"CAPABILITY":
            return capability.parse_capability_list(response.text)
    raise _failure(FailureKind.PROTOCOL, "no CAPABILITY response")


def starttls(policy: BackendPolicy, caps: tuple[bytes, ...]) -> Steps[tuple[bytes, ...]]:
    if not capability.has(caps, b"STARTTLS") or not policy.tls_available:
        why = "TLS is required" if policy.force_tls else "server says LOGINDISABLED"
        raise _failure(
            FailureKind.TLS,
            f"{why} but STARTTLS is not possible; refusing to send a password in clear",
        )
    _, done = yield from command(b"S0001 STARTTLS\r\n", b"S0001")
    if done.word != b"OK":
        raise _failure(FailureKind.TLS, "STARTTLS refused: " + _text(done))
    yield START_TLS
    # RFC 9051 §6.2.1: capabilities known before TLS must be discarded.
    return (yield from capabilities_of(b"C0002"))


def replay_id(client_id: tuple[bytes | None, ...] | None, tag: bytes) -> Steps[list[Response]]:
    """Send the client's ID (RFC 2971); a refusal is not fatal. Return the untagged responses."""
    args = b"NIL" if client_id is None else encode_string_list(client_id)
    untagged, _ = yield from command(tag + b" ID " + args + b"\r\n", tag)
    return untagged


AUTHENTICATION_FAILED = b"NO [AUTHENTICATIONFAILED] Authentication failed."


def check_shared_secret(credentials: Credentials, policy: BackendPolicy) -> None:
    """Static-identity mode: the client's password must be ``auth_shared_secret``.

    Checked before any backend contact, in constant time; otherwise anyone could log in as
    anyone through the master identity.
    """
    if policy.static_identity is None:
        return
    if policy.shared_secret is None or not same_digest(credentials.password, policy.shared_secret):
        raise _failure(
            FailureKind.AUTH_REJECTED, "shared secret was wrong", reply=AUTHENTICATION_FAILED
        )


def login_id(
    policy: BackendPolicy,
    caps: tuple[bytes, ...],
    client_id: IdFields | None,
    origin: ClientOrigin | None,
) -> IdFields | None:
    """The ID to send before logging in: the client's, merged with the client's address when
    forwarding and the server offers ID (``forwarding``); fields the client may not set are
    never passed on."""
    if origin is None:
        return client_id
    if policy.forward_client_address and capability.has(caps, b"ID"):
        return forwarding.id_fields(origin, client_id)
    return forwarding.client_fields(origin, client_id)


def login_dialogue(
    credentials: Credentials,
    policy: BackendPolicy,
    client_id: IdFields | None,
    origin: ClientOrigin | None = None,
) -> Steps[LoginResult]:
    text, caps = yield from greeting(policy)
    fields = login_id(policy, caps, client_id, origin)
    if fields is not None:
        yield from replay_id(fields, b"I0001")
    if policy.preauth_command:
        _, done = yield from command(b"P0001 " + policy.preauth_command + b"\r\n", b"P0001")
        if done.word != b"OK":
            raise _failure(FailureKind.PROTOCOL, "preauth_command failed: " + _text(done))
    untagged, done = yield from authenticate(credentials, policy, caps)
    if done.word != b"OK":
        raise _failure(
            FailureKind.AUTH_REJECTED,
            "server refused login: " + _text(done),
            reply=done.status_text,
        )
    reply = capability.filter_login_reply(done.status_text)
    cap_lines = tuple(r.raw for r in untagged if r.word == b"CAPABILITY")
    post = capability.from_response_code(done.code)
    if post is None and cap_lines:
        post = capability.parse_capability_list(untagged[-1].text)
    return LoginResult(text, caps, reply, cap_lines, post or ())


def authenticate(
    credentials: Credentials, policy: BackendPolicy, caps: tuple[bytes, ...]
) -> Steps[Exchange]:
    if policy.static_identity is not None:
        authcid, password = policy.static_identity
        message = sasl.encode_plain(credentials.username, authcid, password)
        return (yield from authenticate_plain(message, caps))
    if policy.sasl_plain:
        message = sasl.encode_plain(b"", credentials.username, credentials.password)
        return (yield from authenticate_plain(message, caps))
    return (yield from login(credentials, caps))


def authenticate_plain(message: bytes, caps: tuple[bytes, ...]) -> Steps[Exchange]:
    if capability.has(caps, b"SASL-IR"):  # RFC 4959
        return (yield from command(b"A0001 AUTHENTICATE PLAIN " + message + b"\r\n", b"A0001"))
    yield Send(b"A0001 AUTHENTICATE PLAIN\r\n")
    refused = yield from go_ahead("AUTHENTICATE")
    if refused is not None:
        return [], refused
    return (yield from command(message + b"\r\n", b"A0001"))


def login(credentials: Credentials, caps: tuple[bytes, ...]) -> Steps[Exchange]:
    """LOGIN with the user name and password as quoted strings or literals (RFC 9051 §6.2.3)."""
    literal_plus = capability.has(caps, b"LITERAL+")
    wire = build_command(
        b"A0001", b"LOGIN", (credentials.username, credentials.password), literal_plus=literal_plus
    )
    if not wire.synchronizing:  # LITERAL+: everything in one write
        parts = [p for pair in zip(wire.pieces, wire.literals, strict=False) for p in pair]
        return (yield from command(b"".join(parts) + wire.pieces[-1], b"A0001"))
    for piece, literal in zip(wire.pieces, wire.literals, strict=False):
        yield Send(piece)
        refused = yield from go_ahead("a literal")
        if refused is not None:
            return [], refused
        yield Send(literal)
    return (yield from command(wire.pieces[-1], b"A0001"))


def go_ahead(what: str) -> Steps[Response | None]:
    """After a line that waits for "+": None on "+", the completion if the server refused."""
    response = yield READ
    assert isinstance(response, Response)
    if response.tag == b"A0001":
        return response
    if response.tag != b"+":
        raise _failure(FailureKind.PROTOCOL, f"expected a continuation for {what}")
    return None

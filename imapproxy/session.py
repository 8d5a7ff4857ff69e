"""The client's not-authenticated state: the proxy answers for the backend (RFC 9051 §6.1, §6.2).

Sans-I/O: ``receive_data()`` then ``next_action()`` until ``NEED_DATA``. Actions:

* ``Reply``: bytes to send (each one whole response burst, for one ``sendall``), maybe closing;
* ``LoginRequested``: the client gave credentials (LOGIN, AUTHENTICATE PLAIN or LOGIN); the I/O
  layer gets a backend session and hands the framer to the relay, or replies with the failure
  and goes on pulling actions;
* ``AdminRequested``: an ``XPROXY_*`` command (only when enabled and allowed);
* ``Closed``: the client went away.

Answered here: CAPABILITY, NOOP, LOGOUT, ID (RFC 2971; the client's ID is kept to be replayed to
the backend session), LOGIN with atoms, quoted strings and literals (``{n}``/``{n+}``),
AUTHENTICATE PLAIN (with or without SASL-IR initial response) and LOGIN, ``*`` cancelling. All
else gets ``BAD Please login first``; after ``MAX_BAD_COMMANDS`` errors the client is
disconnected. When the policy says no login yet (TLS required), LOGIN and AUTHENTICATE are
refused at their command line, before any continuation that would invite a secret.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from imapproxy.credentials import MAX_PASSWORD_BYTES, MAX_USERNAME_BYTES, Credentials
from imapproxy.errors import ClientProtocolError, LimitExceeded
from imapproxy.protocol import sasl
from imapproxy.protocol.framing import (
    AWAIT_CONTINUATION,
    NEED_DATA,
    ClientClosed,
    CommandFramer,
    Line,
    LiteralData,
    Marker,
)
from imapproxy.protocol.grammar import (
    Arguments,
    encode_string_list,
    split_command_line,
    two_astrings,
)

# Before login the proxy holds whole commands in memory, so both are small. up-imapproxy's
# BUFSIZE is 8192; a base64 PLAIN response with the longest password needs ~11 KiB.
PRELOGIN_MAX_LINE_BYTES = 16384
PRELOGIN_MAX_LITERAL_BYTES = MAX_PASSWORD_BYTES
# Dovecot's CLIENT_MAX_BAD_COMMANDS: errors tolerated before the client is disconnected.
MAX_BAD_COMMANDS = 20

CONTINUE_LITERAL = b"+ go ahead\r\n"  # up-imapproxy's exact go-ahead text
PROXY_ID = b'("name" "imapproxy")'
ADMIN_COMMANDS = frozenset(
    {
        b"XPROXY_DUMPICC",
        b"XPROXY_TRACE",
        b"XPROXY_NEWLOG",
        b"XPROXY_RESETCOUNTERS",
        b"XPROXY_VERSION",
        b"XPROXY_STATUS",
        b"XPROXY_SERVERS",
    }
)


@dataclass(frozen=True, slots=True)
class Reply:
    data: bytes
    close: bool = False


@dataclass(frozen=True, slots=True)
class LoginRequested:
    tag: bytes
    credentials: Credentials = field(repr=False)


@dataclass(frozen=True, slots=True)
class AdminRequested:
    tag: bytes
    name: bytes
    argument: bytes | None


@dataclass(frozen=True, slots=True)
class Closed:
    pass


@dataclass(frozen=True, slots=True)
class StartTLSRequested:
    """STARTTLS (RFC 9051 §6.2.1): reply, handshake, then call ``tls_started()``."""

    tag: bytes

    def reply(self) -> bytes:
        return self.tag + b" OK Begin TLS negotiation now\r\n"


Action = Reply | LoginRequested | AdminRequested | StartTLSRequested | Closed | Marker


class _Auth(enum.Enum):
    NONE = 0
    PLAIN = 1  # waiting for the PLAIN response line
    LOGIN_USER = 2  # AUTHENTICATE LOGIN: waiting for the user name
    LOGIN_PASSWORD = 3  # ... and for the password


class Policy(Protocol):
    """What the I/O layer tells the session about the proxy's set-up and this connection:
    ``PreLoginPolicy``, or the connection itself (``connection.ClientConnection``)."""

    def capabilities(self) -> bytes: ...  # the current "* CAPABILITY ..." list text

    def admin_enabled(self) -> bool: ...

    def starttls_offered(self) -> bool: ...  # STARTTLS possible now

    def login_allowed(self) -> bool: ...  # False: TLS first (LOGINDISABLED)


@dataclass
class PreLoginPolicy:
    """A ``Policy`` made of callables."""

    capabilities: Callable[[], bytes]  # current "* CAPABILITY ..." list text, refreshed live
    admin_enabled: Callable[[], bool] = lambda: False
    starttls_offered: Callable[[], bool] = lambda: False  # STARTTLS possible now
    login_allowed: Callable[[], bool] = lambda: True  # False: TLS first (LOGINDISABLED)


_LOGIN_COMMANDS = frozenset({b"LOGIN", b"AUTHENTICATE"})
PRIVACY_REQUIRED = "[PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure connections"


class PreLoginSession:
    """The proxy's side of a client connection until the client is logged in."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.framer = CommandFramer(PRELOGIN_MAX_LINE_BYTES)
        self.client_id: tuple[bytes | None, ...] | None = None
        self.bad_commands = 0
        self._lines: list[bytes] = []
        self._literals: list[bytes] = []
        self._literal = bytearray()
        self._auth = _Auth.NONE
        self._auth_tag = b""
        self._auth_user = b""
        self._closed = False

    def receive_data(self, data: bytes) -> None:
        self.framer.receive_data(data)

    def tls_started(self) -> None:
        """After the handshake: plaintext the client pipelined after STARTTLS is discarded
        (a man in the middle could have injected it, CVE-2011-0411), capabilities change."""
        self.framer = CommandFramer(PRELOGIN_MAX_LINE_BYTES)
        self._reset_command()

    def next_action(self) -> Action:
        if self._closed:
            return NEED_DATA
        try:
            return self._next_action()
        except ClientProtocolError as error:
            self._reset_command()
            return self._refuse(error)

    def _refuse(self, error: ClientProtocolError) -> Action:
        self.bad_commands += 1
        if error.fatal:
            self._closed = True
            return Reply(error.response(), close=True)
        if self.bad_commands >= MAX_BAD_COMMANDS:
            self._closed = True
            return Reply(error.response() + b"* BYE Too many invalid IMAP commands\r\n", close=True)
        return Reply(error.response())

    def _next_action(self) -> Action:
        while True:
            event = self.framer.next_event()
            if event is NEED_DATA:
                return NEED_DATA
            if event is AWAIT_CONTINUATION:
                return self._literal_requested()
            if isinstance(event, ClientClosed):
                self._closed = True
                return Closed()
            if isinstance(event, LiteralData):
                self._literal += event.data
                if event.last:
                    self._literals.append(bytes(self._literal))
                    self._literal.clear()
                continue
            assert isinstance(event, Line)
            action = self._line(event)
            if action is not None:
                return action

    def _literal_requested(self) -> Action:
        """A synchronising literal was announced: grant it or refuse the command."""
        spec = self.framer.pending_literal
        if self._lines and spec is not None and spec.size <= PRELOGIN_MAX_LITERAL_BYTES:
            if not self._login_refused(self._lines[0]):
                self.framer.accept_literal()
                return Reply(CONTINUE_LITERAL)
            self.framer.reject_literal()  # the literal may be the password: never invite it
            login_tag = split_command_line(self._lines[0]).tag
            self._reset_command()
            raise ClientProtocolError(PRIVACY_REQUIRED, tag=login_tag, status="NO")
        self.framer.reject_literal()
        tag = split_command_line(self._lines[0]).tag if self._lines else None
        self._reset_command()
        raise ClientProtocolError("Literal too big", tag=tag)

    def _login_refused(self, first_line: bytes) -> bool:
        """A LOGIN or AUTHENTICATE that ``client_tls_required`` refuses on this connection."""
        if self.policy.login_allowed():
            return False
        try:
            return split_command_line(first_line).name in _LOGIN_COMMANDS
        except ClientProtocolError:
            return False  # refused when the command is complete, as before

    def _line(self, line: Line) -> Action | None:
        if self._auth is not _Auth.NONE:
            return self._auth_response(line.data.rstrip(b"\r\n"))
        text = line.data.rstrip(b"\r\n")
        if line.literal is not None:
            if not line.literal.synchronizing and line.literal.size > PRELOGIN_MAX_LITERAL_BYTES:
                raise LimitExceeded("Literal too big")
            self._lines.append(text)
            return None
        self._lines.append(text)
        lines, literals = self._lines, self._literals
        self._reset_command()
        return self._command(lines, literals)

    def _reset_command(self) -> None:
        self._lines, self._literals = [], []
        self._literal.clear()

    # -- commands -------------------------------------------------------------------------------

    def _command(self, lines: list[bytes], literals: list[bytes]) -> Action | None:
        start = split_command_line(lines[0])
        if start.name == b"LOGIN" and not literals:  # the usual LOGIN, read in one match
            arguments = two_astrings(start.rest)
            if arguments is not None:
                return self._credentials(start.tag, *arguments, "LOGIN")
        args = Arguments(lines, literals, start.tag)
        handler = _HANDLERS.get(start.name)
        if start.name in ADMIN_COMMANDS:
            return self._admin(start.tag, start.name, args)
        if handler is None:
            raise ClientProtocolError("Please login first", tag=start.tag)
        return handler(self, start.tag, args)

    def _capability(self, tag: bytes, args: Arguments) -> Action:
        args.expect_end()
        return Reply(self.policy.capabilities() + b"\r\n" + tag + b" OK Completed\r\n")

    def _noop(self, tag: bytes, args: Arguments) -> Action:
        args.expect_end()
        return Reply(tag + b" OK Completed\r\n")

    def _logout(self, tag: bytes, args: Arguments) -> Action:
        args.expect_end()
        self._closed = True
        return Reply(b"* BYE LOGOUT received\r\n" + tag + b" OK Completed\r\n", close=True)

    def _id(self, tag: bytes, args: Arguments) -> Action:
        args.space()
        items = args.nil_or_string_list()
        args.expect_end()
        if items is not None and (len(items) % 2 or any(key is None for key in items[::2])):
            raise ClientProtocolError("Invalid ID parameter list", tag=tag)
        self.client_id = tuple(items) if items else None
        return Reply(b"* ID " + PROXY_ID + b"\r\n" + tag + b" OK Completed\r\n")

    def _starttls(self, tag: bytes, args: Arguments) -> Action:
        args.expect_end()
        if not self.policy.starttls_offered():
            raise ClientProtocolError("Please login first", tag=tag)
        return StartTLSRequested(tag)

    def _login(self, tag: bytes, args: Arguments) -> Action:
        args.space()
        username = args.astring()
        args.space()
        password = args.astring()
        args.expect_end()
        return self._credentials(tag, username, password, "LOGIN")

    def _authenticate(self, tag: bytes, args: Arguments) -> Action:
        args.space()
        mechanism = args.atom().upper()
        initial = None
        if not args.at_end():
            args.space()
            initial = args.rest_of_line()
        args.expect_end()
        self._check_privacy(tag)  # before any "+": no secret is invited onto a cleartext link
        if mechanism == b"PLAIN":
            return self._start_plain(tag, initial)
        if mechanism == b"LOGIN":
            return self._start_login(tag, initial)
        raise ClientProtocolError("Unsupported authentication mechanism", tag=tag, status="NO")

    def _admin(self, tag: bytes, name: bytes, args: Arguments) -> Action:
        if not self.policy.admin_enabled():
            raise ClientProtocolError("Unrecognized command", tag=tag)
        argument = None
        if not args.at_end():
            args.space()
            argument = args.astring()
        args.expect_end()
        return AdminRequested(tag, name, argument)

    # -- AUTHENTICATE exchanges -----------------------------------------------------------------

    def _start_plain(self, tag: bytes, initial: bytes | None) -> Action:
        if initial is not None:
            return self._plain_message(tag, sasl.decode_response(initial, tag))
        self._auth, self._auth_tag = _Auth.PLAIN, tag
        return Reply(b"+ \r\n")

    def _start_login(self, tag: bytes, initial: bytes | None) -> Action:
        self._auth_tag = tag
        if initial is not None:
            self._auth_user = sasl.decode_response(initial, tag)
            self._auth = _Auth.LOGIN_PASSWORD
            return Reply(b"+ " + sasl.LOGIN_PASSWORD_CHALLENGE + b"\r\n")
        self._auth = _Auth.LOGIN_USER
        return Reply(b"+ " + sasl.LOGIN_USERNAME_CHALLENGE + b"\r\n")

    def _auth_response(self, line: bytes) -> Action:
        state, tag = self._auth, self._auth_tag
        self._auth = _Auth.NONE
        response = sasl.decode_response(line, tag)
        if state is _Auth.PLAIN:
            return self._plain_message(tag, response)
        if state is _Auth.LOGIN_USER:
            self._auth, self._auth_user = _Auth.LOGIN_PASSWORD, response
            return Reply(b"+ " + sasl.LOGIN_PASSWORD_CHALLENGE + b"\r\n")
        username, self._auth_user = self._auth_user, b""
        return self._credentials(tag, username, response, "AUTH-LOGIN")

    def _plain_message(self, tag: bytes, message: bytes) -> Action:
        username, password = sasl.parse_plain(message, tag)
        return self._credentials(tag, username, password, "PLAIN")

    def _check_privacy(self, tag: bytes) -> None:
        """``client_tls_required`` on a cleartext connection: every LOGIN and AUTHENTICATE is
        refused at its command line (RFC 9051 §6.2.2, §7.1 ``PRIVACYREQUIRED``)."""
        if not self.policy.login_allowed():
            raise ClientProtocolError(PRIVACY_REQUIRED, tag=tag, status="NO")

    def _credentials(self, tag: bytes, username: bytes, password: bytes, how: str) -> Action:
        self._check_privacy(tag)
        if not username or len(username) > MAX_USERNAME_BYTES or b"\x00" in username:
            raise ClientProtocolError("Invalid user name", tag=tag, status="NO")
        if len(password) > MAX_PASSWORD_BYTES or b"\x00" in password:
            raise ClientProtocolError(
                "[AUTHENTICATIONFAILED] Invalid password", tag=tag, status="NO"
            )
        return LoginRequested(tag, Credentials(username, password, how))


_HANDLERS: dict[bytes, Callable[[PreLoginSession, bytes, Arguments], Action]] = {
    b"CAPABILITY": PreLoginSession._capability,
    b"NOOP": PreLoginSession._noop,
    b"LOGOUT": PreLoginSession._logout,
    b"ID": PreLoginSession._id,
    b"LOGIN": PreLoginSession._login,
    b"AUTHENTICATE": PreLoginSession._authenticate,
    b"STARTTLS": PreLoginSession._starttls,
}


def id_command_args(client_id: tuple[bytes | None, ...] | None) -> bytes:
    """The argument of an ID command replaying ``client_id`` (``NIL`` when it had none)."""
    return b"NIL" if client_id is None else encode_string_list(client_id)

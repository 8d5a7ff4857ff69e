"""The exception tree. An error that reaches a client carries the IMAP response it becomes.

* ``ConfigError``: a bad configuration file, naming file, line and key.
* ``ClientProtocolError``: the client broke the protocol; ``response()`` is the reply
  (tagged ``BAD``/``NO`` when the connection goes on, ``* BYE`` when it is ``fatal``).
* ``LimitExceeded``: a client went over one of our limits (a ``ClientProtocolError``).
* ``BackendFailure``: the backend could not give the client a session; ``kind`` picks the client
  reply from one table (``CLIENT_REPLY``), in the manner of Dovecot's login proxy, while ``detail``
  goes to the log only.

Messages never contain client data that could be a password: callers pass fixed texts.
"""

from __future__ import annotations

import enum

CRLF = b"\r\n"


class ProxyError(Exception):
    """Base of every error the proxy raises on purpose."""


class ConfigError(ProxyError):
    """A configuration problem, reported as ``file:line: key: message``."""

    def __init__(self, path: str, lineno: int | None, key: str | None, message: str) -> None:
        self.path, self.lineno, self.key, self.message = path, lineno, key, message
        where = f"{path}:{lineno}" if lineno else path
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


class ClientProtocolError(ProxyError):
    """The client sent something we refuse; ``response()`` is what it gets."""

    def __init__(
        self, text: str, *, tag: bytes | None = None, status: str = "BAD", fatal: bool = False
    ) -> None:
        super().__init__(text)
        self.text, self.tag, self.status, self.fatal = text, tag, status, fatal

    def response(self) -> bytes:
        if self.fatal:
            return b"* BYE " + self.text.encode() + CRLF
        return b"%s %s %s\r\n" % (self.tag or b"*", self.status.encode(), self.text.encode())


class LimitExceeded(ClientProtocolError):
    """A client went over a limit (line, literal, bad commands, time)."""

    def __init__(
        self, text: str, *, tag: bytes | None = None, status: str = "BAD", fatal: bool = True
    ) -> None:
        super().__init__(text, tag=tag, status=status, fatal=fatal)


class BackendProtocolError(ProxyError):
    """The backend sent something that is not IMAP as we know it."""


class FailureKind(enum.Enum):
    """Why a backend session could not be had (Dovecot login-proxy taxonomy)."""

    CONNECT = "connect"
    TLS = "tls"
    PROTOCOL = "protocol"
    TIMEOUT = "timeout"
    LOST = "lost"  # a logged-in session's connection broke (not a failure to connect)
    AUTH_REJECTED = "auth rejected"
    CAPACITY = "capacity"
    ROUTE = "route lookup"  # the route source failed or timed out (never a silent fallback)
    INTERNAL = "internal"


# What the client is told for each kind; the detail goes to the log, never to the client.
CLIENT_REPLY: dict[FailureKind, bytes] = {
    FailureKind.CONNECT: b"NO [UNAVAILABLE] IMAP server unavailable, try again later",
    FailureKind.TLS: b"NO [UNAVAILABLE] Secure connection to IMAP server failed",
    FailureKind.PROTOCOL: b"NO [UNAVAILABLE] IMAP server failed to respond properly",
    FailureKind.TIMEOUT: b"NO [UNAVAILABLE] IMAP server did not respond in time",
    FailureKind.LOST: b"NO [UNAVAILABLE] IMAP server connection lost",
    FailureKind.CAPACITY: b"NO [UNAVAILABLE] Proxy connection limit reached, try again later",
    FailureKind.ROUTE: b"NO [UNAVAILABLE] Cannot find your IMAP server now, try again later",
    FailureKind.INTERNAL: b"NO [SERVERBUG] Internal proxy error",
}
# A login with no route and no default server (RFC 5530: the same reply as a bad password, so
# that a client cannot tell which names exist).
NO_ROUTE_REPLY = b"NO [AUTHENTICATIONFAILED] Authentication failed."


class BackendFailure(ProxyError):
    """A backend session could not be set up or was lost.

    ``reply`` is the status and text for the client (without tag); for ``AUTH_REJECTED`` it is
    the backend's own ``NO [AUTHENTICATIONFAILED] ...`` (RFC 5530), otherwise it comes from
    ``CLIENT_REPLY``.
    """

    def __init__(self, kind: FailureKind, detail: str, reply: bytes | None = None) -> None:
        super().__init__(f"{kind.value}: {detail}")
        self.kind, self.detail = kind, detail
        self.reply = reply if reply is not None else CLIENT_REPLY[kind]

    def response(self, tag: bytes) -> bytes:
        return tag + b" " + self.reply + CRLF


def why(error: BaseException) -> str:
    """What the log says of an error: a ``BackendFailure``'s detail, else its message."""
    if isinstance(error, BackendFailure):
        return error.detail
    return str(error) or type(error).__name__

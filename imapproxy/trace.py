"""The protocol trace (XPROXY_TRACE): one user's sessions written to ``protocol_log_filename``.

Record format, as up-imapproxy's (``-----> C= <unix time> <user> CLIENT|SERVER: sd [<n>]`` then
the raw bytes), plus ``PROXY`` notes (login, SELECT cache hits, logout). Only one user at a
time, from its next login on, as up-imapproxy. Client data reaches the trace through
``redact.ClientRedactor``, so that no password is ever written, whatever form a login takes.
"""

from __future__ import annotations

import os
import time

from imapproxy.redact import ClientRedactor


class Tracer:
    """The trace file and the user being traced."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.user: bytes | None = None
        # Created (truncated) at start-up, mode 0600, as up-imapproxy (ServerInit).
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)

    def close(self) -> None:
        os.close(self.fd)

    def record(self, user: bytes, what: bytes, data: bytes = b"") -> None:
        """One record: up-imapproxy's header line, then the bytes."""
        os.write(self.fd, b"\n\n-----> C= %d %s %s\n" % (int(time.time()), user, what) + data)

    def enable(self, user: bytes) -> None:
        self.user = user
        self.record(user, b"PROXY: user tracing enabled.")

    def disable(self) -> None:
        if self.user is not None:
            self.record(
                self.user,
                b"PROXY: user tracing disabled. Expect further output until client logout.",
            )
        self.user = None

    def truncate(self) -> None:
        os.ftruncate(self.fd, 0)

    def for_user(self, username: bytes, sd: int) -> SessionTrace | None:
        """The trace of a session of ``username`` if it is the one traced, else None."""
        if self.user is None or username != self.user:
            return None
        return SessionTrace(self, username, sd)


class SessionTrace:
    """One traced session: what the client sent (redacted), what it got, proxy notes."""

    def __init__(self, tracer: Tracer, username: bytes, sd: int) -> None:
        self.tracer, self.username, self.sd = tracer, username, sd
        self.redactor = ClientRedactor()
        self._server_muted = False

    def _record(self, who: bytes, data: bytes) -> None:
        self.tracer.record(self.username, b"%s: sd [%d]" % (who, self.sd), data)

    def server(self, data: bytes) -> None:
        if not self.redactor.saw_secret:
            self._record(b"SERVER", data)
        elif not self._server_muted:
            self._server_muted = True
            self.proxy("server data no longer traced: the client sent credentials after login")

    def client(self, literal: bytes, line: bytes) -> None:
        """A literal and the line after it, read by the proxy itself (a SELECT's mailbox)."""
        redactor = self.redactor
        self._record(b"CLIENT", redactor.literal(literal) + redactor.continuation_line(line))

    def client_command(self, data: bytes, tag: bytes | None, name: bytes | None) -> None:
        self._record(b"CLIENT", self.redactor.command_line(data, tag, name))

    def client_continuation(self, data: bytes) -> None:
        self._record(b"CLIENT", self.redactor.continuation_line(data))

    def client_literal(self, data: bytes) -> None:
        self._record(b"CLIENT", self.redactor.literal(data))

    def client_response(self, data: bytes) -> None:
        self._record(b"CLIENT", self.redactor.response_line(data))

    def proxy(self, note: str) -> None:
        """A note of the proxy's own, as up-imapproxy's "PROXY: user tracing enabled." lines."""
        self.tracer.record(self.username, b"PROXY: " + note.encode())

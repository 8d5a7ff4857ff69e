"""The protocol trace (XPROXY_TRACE): one user's sessions written to ``protocol_log_filename``.

Record format, as up-imapproxy's (``-----> C= <unix time> <user> CLIENT|SERVER: sd [<n>]`` then
the raw bytes). Only one user at a time. Client data reaches the trace through ``redact``, so
that no password is ever written, whatever form a login takes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

TraceWriter = Callable[[str, bytes], None]


class Tracer:
    """The trace file and the user being traced."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.user: bytes | None = None
        # Created (truncated) at start-up, mode 0600, as up-imapproxy (ServerInit).
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)

    def close(self) -> None:
        os.close(self.fd)

    def _header(self, user: bytes, what: bytes) -> bytes:
        return b"\n\n-----> C= %d %s %s\n" % (int(time.time()), user, what)

    def _write(self, data: bytes) -> None:
        os.write(self.fd, data)

    def enable(self, user: bytes) -> None:
        self.user = user
        self._write(self._header(user, b"PROXY: user tracing enabled."))

    def disable(self) -> None:
        if self.user is not None:
            self._write(
                self._header(
                    self.user,
                    b"PROXY: user tracing disabled. Expect further output until client logout.",
                )
            )
        self.user = None

    def truncate(self) -> None:
        os.ftruncate(self.fd, 0)

    def for_user(self, username: bytes, sd: int) -> TraceWriter | None:
        """A writer for a session of ``username`` if it is the one traced, else None."""
        if self.user is None or username != self.user:
            return None

        def write(direction: str, data: bytes) -> None:
            header = self._header(username, b"%s: sd [%d]" % (direction.encode(), sd))
            self._write(header + data)

        return write

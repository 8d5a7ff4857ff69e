"""The single place where secrets are masked before anything is written down.

The protocol trace records a user's post-login traffic. A client may still send a password
there (a second LOGIN, an AUTHENTICATE exchange, their literals), so the client side of the
trace goes through ``ClientRedactor``: such commands are recorded as ``tag LOGIN <redacted>``
and everything that belongs to them (literals, continuation lines, SASL responses) as
``<redacted>``. The server may echo such pieces (Dovecot answers the unread literal of an
unknown command as a command of its own, the password becoming the tag of a ``BAD``), so once
a client has sent one, the server side of that session is no longer traced. Logs never receive
client data at all, only user names and fixed texts.
"""

from __future__ import annotations

from typing import Final

REDACTED: Final = b"<redacted>"
SECRET_COMMANDS: Final = frozenset({b"LOGIN", b"AUTHENTICATE"})


class ClientRedactor:
    """Follows one client's command stream and says what the trace may show of each piece."""

    def __init__(self) -> None:
        self._in_secret = False  # inside a LOGIN/AUTHENTICATE command or its exchange
        self.saw_secret = False  # such a command was sent: the server may echo its pieces

    def command_line(self, data: bytes, tag: bytes | None, name: bytes | None) -> bytes:
        """A line that starts a command (``tag``/``name`` None when it is not parseable)."""
        self._in_secret = name in SECRET_COMMANDS
        self.saw_secret = self.saw_secret or self._in_secret
        if self._in_secret and tag is not None and name is not None:
            return tag + b" " + name + b" " + REDACTED + b"\r\n"
        return data

    def continuation_line(self, data: bytes) -> bytes:
        """A line that continues the current command after a literal."""
        return REDACTED + b"\r\n" if self._in_secret else data

    def literal(self, data: bytes) -> bytes:
        return REDACTED if self._in_secret else data

    def response_line(self, data: bytes) -> bytes:
        """A line answering a server's "+" (IDLE's DONE, or a SASL response)."""
        return REDACTED + b"\r\n" if self._in_secret else data

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


def names_secret(line: bytes) -> bool:
    """Whether a client line may be a LOGIN or AUTHENTICATE, however malformed (a bad tag, two
    spaces, a line the relay took for an answer to "+"): one of its first three words."""
    return any(word.upper() in SECRET_COMMANDS for word in line.split(None, 3)[:3])


class ClientRedactor:
    """Follows one client's command stream and says what the trace may show of each piece.

    It fails closed: it does not trust the relay's reading of a hostile stream. Any line that
    names LOGIN or AUTHENTICATE is secret, and so is a line that does not parse as a command
    while a secret exchange is under way (a SASL response sent before the server's "+", or a
    literal the server refused, reach the relay as such lines).
    """

    def __init__(self) -> None:
        self._in_secret = False  # inside a LOGIN/AUTHENTICATE command or its exchange
        self.saw_secret = False  # such a command was sent: the server may echo its pieces

    def command_line(self, data: bytes, tag: bytes | None, name: bytes | None) -> bytes:
        """A line that starts a command (``tag``/``name`` None when it is not parseable)."""
        parsed = tag is not None and name is not None
        self._secret(names_secret(data) or (self._in_secret and not parsed))
        if not self._in_secret:
            return data
        if tag is not None and name is not None:
            return tag + b" " + name + b" " + REDACTED + b"\r\n"
        return REDACTED + b"\r\n"

    def continuation_line(self, data: bytes) -> bytes:
        """A line that continues the current command after a literal."""
        return REDACTED + b"\r\n" if self._in_secret else data

    def literal(self, data: bytes) -> bytes:
        return REDACTED if self._in_secret else data

    def response_line(self, data: bytes) -> bytes:
        """A line answering a server's "+" (IDLE's DONE, or a SASL response); if it names a
        secret command, the relay counted a "+" too many, and it is that command."""
        if names_secret(data):
            self._secret(True)
        return REDACTED + b"\r\n" if self._in_secret else data

    def _secret(self, secret: bool) -> None:
        self._in_secret = secret
        self.saw_secret = self.saw_secret or secret

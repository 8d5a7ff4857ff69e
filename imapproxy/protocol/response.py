"""Reading whole backend responses for the control plane (greeting, login, NOOP, UNSELECT, SELECT).

Sans-I/O: ``receive_data()`` (``b""`` is EOF), then ``next_response()`` until ``NEED_DATA``. A
response is one line plus any literals it carries (RFC 9051 §2.2.2, §4.3), kept whole in
``raw`` so that it can be forwarded exactly. Responses larger than ``max_response_bytes`` raise
``BackendProtocolError``: the control plane never needs big ones, and the data plane does not use
this reader (see ``scanner``).
"""

from __future__ import annotations

from dataclasses import dataclass

from imapproxy.errors import BackendProtocolError
from imapproxy.protocol.framing import NEED_DATA, Marker, parse_literal_marker

_BRACE, _CR = ord("}"), ord("\r")
# Large enough for any greeting, CAPABILITY, LOGIN or SELECT reply seen in the wild.
MAX_CONTROL_RESPONSE_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Response:
    """One server response.

    ``tag`` is ``b"*"`` (untagged), ``b"+"`` (continuation request) or the command's tag;
    ``word`` the upper-cased word after it (``OK``, ``NO``, ``BAD``, ``BYE``, ``CAPABILITY``, or a
    number as in ``* 5 EXISTS``); ``text`` the rest of the first line.
    """

    raw: bytes
    tag: bytes
    word: bytes
    text: bytes

    @property
    def is_tagged(self) -> bool:
        return self.tag not in (b"*", b"+")

    @property
    def code(self) -> bytes | None:
        """The response code of a status response, ``[...]`` without brackets (RFC 9051 §7.1)."""
        if not self.text.startswith(b"["):
            return None
        end = self.text.find(b"]")
        return self.text[1:end] if end > 0 else None

    @property
    def status_text(self) -> bytes:
        """``word`` and ``text`` of the first line: what follows the tag (``OK [..] Logged in``)."""
        return self.word + b" " + self.text if self.text else self.word


def parse_first_line(line: bytes) -> tuple[bytes, bytes, bytes]:
    """Split a response's first line (no CRLF) into tag, upper-cased word and the rest."""
    tag, _, after = line.partition(b" ")
    word, _, text = after.partition(b" ")
    return tag, word.upper(), text


class BackendClosed(BackendProtocolError):
    """The backend closed the connection."""


class ResponseReader:
    """Assembles complete responses from the backend's bytes."""

    def __init__(self, max_response_bytes: int = MAX_CONTROL_RESPONSE_BYTES) -> None:
        self.max_response_bytes = max_response_bytes
        self._buffer = bytearray()
        self._eof = False

    def receive_data(self, data: bytes) -> None:
        if data:
            self._buffer += data
        else:
            self._eof = True

    def has_buffered(self) -> bool:
        """Whether bytes were received that are not yet returned as responses."""
        return bool(self._buffer)

    def take_buffered(self) -> bytes:
        """Remove and return bytes received but not yet returned as responses."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def next_response(self) -> Response | Marker:
        end = self._response_end()
        if end is None:
            if self._eof:
                raise BackendClosed("connection closed by server")
            if len(self._buffer) > self.max_response_bytes:
                raise BackendProtocolError("response too large")
            return NEED_DATA
        raw = bytes(self._buffer[:end])
        del self._buffer[:end]
        tag, _, after = raw[: raw.find(b"\n")].rstrip(b"\r").partition(b" ")  # parse_first_line
        word, _, text = after.partition(b" ")
        if not tag:
            raise BackendProtocolError("response without a tag")
        return Response(raw, tag, word.upper(), text)

    def _response_end(self) -> int | None:
        """Offset just past the end of the first complete response in the buffer, if any."""
        buffer, pos = self._buffer, 0
        while True:
            eol = buffer.find(b"\n", pos)
            if eol < 0:
                return None
            last = buffer[eol - 1] if eol > pos else 0
            if last != _BRACE and (last != _CR or eol - 2 < pos or buffer[eol - 2] != _BRACE):
                return eol + 1  # no literal announced: the common case, without a copy
            literal = parse_literal_marker(bytes(buffer[pos : eol + 1]))
            if literal is None:
                return eol + 1
            if literal.size > self.max_response_bytes:
                raise BackendProtocolError("literal too large")
            pos = eol + 1 + literal.size
            if pos > len(self._buffer):
                return None

"""Feeding the sans-I/O protocol objects in pieces, as the sockets would (no sockets here)."""

from __future__ import annotations

from imapproxy.protocol.framing import AWAIT_CONTINUATION, NEED_DATA, ClientClosed, CommandFramer
from imapproxy.protocol.scanner import INITIAL_CARRY, MAX_TAGGED_PREFIX_BYTES, ResponseScanner


def split(data: bytes, step: int) -> list[bytes]:
    """``data`` in pieces of ``step`` bytes (the last may be shorter)."""
    return [data[i : i + step] for i in range(0, len(data), step)]


def framer_events(framer: CommandFramer, accept: bool = True) -> list[object]:
    """Every event the framer has now, accepting (or rejecting) each synchronising literal."""
    out: list[object] = []
    while (event := framer.next_event()) is not NEED_DATA:
        out.append(event)
        if event is AWAIT_CONTINUATION:
            framer.accept_literal() if accept else framer.reject_literal()
        elif isinstance(event, ClientClosed):
            break
    return out


def scan_stream(
    chunks: list[bytes], scanner: ResponseScanner | None = None, carry: bytes = INITIAL_CARRY
) -> tuple[list[tuple[bytes, bytes]], ResponseScanner]:
    """Feed chunks the way the copier does (the carry kept at the front of the next buffer),
    to a new scanner or to one that already saw the stream's start (with the carry it left)."""
    scanner = scanner or ResponseScanner()
    events: list[tuple[bytes, bytes]] = []
    for chunk in chunks:
        buf = bytearray(carry + chunk + bytes(MAX_TAGGED_PREFIX_BYTES))
        end = len(carry) + len(chunk)
        keep = scanner.scan(buf, end)
        carry = bytes(buf[end - keep : end])
        events.extend(scanner.events)
        scanner.events.clear()
    return events, scanner

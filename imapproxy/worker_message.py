"""The messages worker processes send each other (``workers N``), as bytes: sans-I/O.

Three kinds travel on a worker's inbox (a ``SOCK_SEQPACKET`` socket: one message per packet, the
descriptors beside it, ``worker_channel``):

* ``HandedClient``: a client connection whose login names a user another worker owns. The
  client's socket travels as a descriptor; the message carries what the accepting worker had
  read and decided, so that the login goes on in the owner as if it had arrived there: the
  LOGIN's tag and credentials, the client's ``ID``, the bytes read after the login command,
  the client's address (from a PROXY header, maybe), the proxy's session id, and whether the
  client spoke TLS (then the descriptor is a local socket that the accepting worker relays to,
  since TLS keys cannot change process).
* ``AdminCall``: an ``XPROXY_*`` command that answers for the whole proxy (or a scrape of
  ``/metrics``); the descriptor is where to write this worker's part.
* ``HandedSession``: a cached session of this worker's user, shipped late by a predecessor
  to the worker that took the hand-over (``takeover``).

Format: a magic and version byte, then JSON with bytes in base64. The password crosses a
socket pair between processes of this proxy only, like the rest of the login; it is never in
a ``repr`` or an error message.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

from imapproxy.credentials import Credentials

MAGIC = b"IPXM"
VERSION = 1
METRICS_CALL = b"METRICS"  # an ``AdminCall`` for a worker's own /metrics figures
# A login and what the client pipelined behind it fit (base64: 4/3); below glibc's 128 KiB
# threshold, so the receive buffer comes from the heap, not from an mmap and munmap each time.
MAX_MESSAGE_BYTES = 96 * 1024


class MessageError(Exception):
    """Bytes that are not a message of this version (never holds their content)."""


@dataclass(frozen=True)
class HandedClient:
    tag: bytes
    credentials: Credentials = field(repr=False)
    client_id: tuple[bytes | None, ...] | None
    unread: bytes = field(repr=False)  # what the client sent after the login command
    address: tuple[str, int]  # the client's (the PROXY header's, when there was one)
    connected_to: tuple[str, int] | None  # the PROXY header's, or the relayed TLS socket's
    session_id: str
    tls: bool  # the descriptor is the accepting worker's relay of a TLS connection


@dataclass(frozen=True)
class AdminCall:
    name: bytes
    argument: bytes | None


@dataclass(frozen=True)
class HandedSession:
    """A cached backend session that a predecessor shipped late (``takeover``) to the worker
    that took the hand-over, for the worker that owns its user; ``record`` is its
    ``session_transfer`` message, the backend socket travels beside it."""

    record: bytes = field(repr=False)


@dataclass(frozen=True)
class Stopping:
    """Worker ``worker`` has handed over and stops: hand it no client for ``lasts_s`` seconds
    (how long its stop may take). ``seen``: the answer of a worker that took note, sent into
    the stopping worker's own inbox, where it comes behind every client that worker handed
    there before (one socket: its packets keep their order)."""

    worker: int
    lasts_s: float = 0.0
    seen: bool = False


Message = HandedClient | AdminCall | HandedSession | Stopping


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64_or_none(data: bytes | None) -> str | None:
    return None if data is None else _b64(data)


def encode(message: Message) -> bytes:
    body: dict[str, Any]
    if isinstance(message, HandedClient):
        body = {
            "kind": "client",
            "tag": _b64(message.tag),
            "username": _b64(message.credentials.username),
            "password": _b64(message.credentials.password),
            "mechanism": message.credentials.mechanism,
            "client_id": None
            if message.client_id is None
            else [_b64_or_none(item) for item in message.client_id],
            "unread": _b64(message.unread),
            "address": list(message.address),
            "connected_to": None if message.connected_to is None else list(message.connected_to),
            "session_id": message.session_id,
            "tls": message.tls,
        }
    elif isinstance(message, HandedSession):
        body = {"kind": "session", "record": _b64(message.record)}
    elif isinstance(message, Stopping):
        body = {
            "kind": "stopping",
            "worker": message.worker,
            "lasts_s": message.lasts_s,
            "seen": message.seen,
        }
    else:
        body = {
            "kind": "admin",
            "name": _b64(message.name),
            "argument": _b64_or_none(message.argument),
        }
    data = MAGIC + bytes([VERSION]) + json.dumps(body, separators=(",", ":")).encode("ascii")
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message of {len(data)} bytes, over {MAX_MESSAGE_BYTES}")
    return data


def decode(data: bytes) -> Message:
    if data[:4] != MAGIC or len(data) < 5:
        raise MessageError("not a worker message")
    if data[4] != VERSION:
        raise MessageError(f"worker message version {data[4]}, expected {VERSION}")
    try:
        body = json.loads(data[5:])
        if not isinstance(body, dict):
            raise MessageError("not a worker message")
        if body.get("kind") == "client":
            return _client(body)
        if body.get("kind") == "admin":
            return AdminCall(_bytes(body["name"]), _bytes_or_none(body["argument"]))
        if body.get("kind") == "session":
            return HandedSession(_bytes(body["record"]))
        if body.get("kind") == "stopping":
            return Stopping(_index(body["worker"]), _seconds(body["lasts_s"]), _flag(body["seen"]))
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeError):
        raise MessageError("malformed worker message") from None
    raise MessageError("unknown worker message")


def _client(body: dict[str, Any]) -> HandedClient:
    client_id = body["client_id"]
    return HandedClient(
        tag=_bytes(body["tag"]),
        credentials=Credentials(
            _bytes(body["username"]), _bytes(body["password"]), _text(body["mechanism"])
        ),
        client_id=None if client_id is None else tuple(_bytes_or_none(i) for i in _list(client_id)),
        unread=_bytes(body["unread"]),
        address=_address(body["address"]),
        connected_to=None if body["connected_to"] is None else _address(body["connected_to"]),
        session_id=_text(body["session_id"]),
        tls=_flag(body["tls"]),
    )


def _bytes(value: object) -> bytes:
    return base64.b64decode(_text(value), validate=True)


def _bytes_or_none(value: object) -> bytes | None:
    return None if value is None else _bytes(value)


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("expected text")
    return value


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError("expected true or false")
    return value


def _index(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 16:
        raise TypeError("expected a worker index")
    return value


def _seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e6:
        raise TypeError("expected a duration")
    return float(value)


def _list(value: object) -> list[object]:
    if not isinstance(value, list):
        raise TypeError("expected a list")
    return value


def _address(value: object) -> tuple[str, int]:
    items = _list(value)
    if len(items) != 2 or not isinstance(items[1], int) or isinstance(items[1], bool):
        raise TypeError("expected [host, port]")
    return _text(items[0]), items[1]

"""The hand-over's wire format: what a running proxy tells its successor, message by message.

Sans-I/O: pure ``encode`` / ``decode`` of whole messages (the transport, ``takeover``, is a
``SOCK_SEQPACKET`` Unix socket: each message one record, the descriptors it carries attached to
it with ``SCM_RIGHTS``). Every message starts with ``MAGIC`` and a kind byte; numbers are
big-endian; a byte string is a 4-byte length and its bytes; an optional value a presence byte.

The conversation (successor S, running proxy R)::

    S: HELLO(version)            R: HELLO(version, processes) | REFUSED(reason)
    R: LISTENERS  (+ one descriptor per listener, in order)
    R: KEY        (the ``CredentialHasher`` key: the digests below are keyed with it)
    R: SESSION *  (+ the backend socket of each)
    R: SENT       (every session cached when S arrived)
    S: READY      (S accepts on the listeners: R closes its copies, stops accepting)
    R: SESSION *  (sessions R's active clients check in while they finish)
    R: END

A running proxy with workers is several processes, each with its own cached sessions: its
HELLO says how many, and the successor has this conversation with each in turn (each one
sends the same listeners and key, and its own sessions), then says READY to all of them.

A HELLO's first bytes (magic, kind, version) keep this layout in every version, so a peer of
another version is always recognised as such (``VersionMismatch``) and refused, never misread.
Passwords never travel: a session carries its user name and credential digest only.
Expiry travels as the time left (``remaining_ms``): a monotonic clock does not cross processes.
``decode`` raises only ``TransferError`` on any input.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from imapproxy.backend_login import LoginResult
from imapproxy.route import Route, TLSMode
from imapproxy.select_cache import MailboxState, SelectEntry

FORMAT_VERSION = 1
MAGIC = b"IPXH"
# One message at most: a session's login reply and SELECT reply are a few kilobytes; Linux
# takes an AF_UNIX record up to the socket's send buffer (net.core.wmem_default, 208 KiB).
MAX_MESSAGE_BYTES = 128 * 1024
MAX_REASON_CHARS = 500
MAX_PROCESSES = 1024  # as many as the statistics file has worker slots

T = TypeVar("T")


class TransferError(Exception):
    """A message that is not one of ours, is cut short, or breaks the conversation's order."""


class VersionMismatch(TransferError):
    """The peer speaks another version of this format."""

    def __init__(self, version: int) -> None:
        super().__init__(
            f"hand-over format version {version}; this program speaks {FORMAT_VERSION}"
        )
        self.version = version


class Kind(enum.IntEnum):
    HELLO = 1
    REFUSED = 2
    LISTENERS = 3
    KEY = 4
    SESSION = 5
    SENT = 6
    READY = 7
    END = 8


class ListenerRole(enum.IntEnum):
    IMAP = 0
    IMAP_TLS = 1  # implicit TLS (client_tls_port)
    METRICS = 2  # metrics_listen
    TAKEOVER = 3  # the hand-over socket itself: the successor serves the next one on it


@dataclass(frozen=True)
class Hello:
    version: int
    pid: int
    # the running proxy's processes that hold sessions (``workers N``): the successor connects
    # once to each; every one of them sends the same listeners and key
    processes: int = 1


@dataclass(frozen=True)
class Refused:
    reason: str


@dataclass(frozen=True)
class Listener:
    """A listening socket's description; the descriptor travels beside the message."""

    role: ListenerRole
    family: int
    host: str
    port: int


@dataclass(frozen=True)
class Listeners:
    listeners: tuple[Listener, ...]


@dataclass(frozen=True)
class HasherKey:
    key: bytes


@dataclass(frozen=True)
class SessionRecord:
    """One cached backend session (its socket travels beside the message)."""

    username: bytes
    digest: bytes  # HMAC of user and password under the sender's key (``HasherKey``)
    route: Route | None  # the connection cache's key beside user and digest
    login: LoginResult
    select_entry: SelectEntry | None
    selected: bool  # the entry's mailbox is still selected on the session
    closed_line: bytes | None  # the server's "* OK [CLOSED]" line, once seen (ServerTraits)
    remaining_ms: int  # time left before expiry
    origin_ip: str | None  # the client address the server was told (reuse_same_client_address)
    server: str  # "host:port" for the log and XPROXY_DUMPICC
    backend_host: str
    backend_port: int


@dataclass(frozen=True)
class Marker:
    """SENT, READY or END, with a count: sessions sent so far (SENT, END), or the pid (READY)."""

    kind: Kind
    count: int


Message = Hello | Refused | Listeners | HasherKey | SessionRecord | Marker
MARKERS = (Kind.SENT, Kind.READY, Kind.END)

# -- encoding ---------------------------------------------------------------------------------

_U8, _U16, _U32, _U64 = (struct.Struct(f) for f in ("!B", "!H", "!I", "!Q"))


class _Writer:
    def __init__(self, kind: Kind) -> None:
        self.parts = [MAGIC, _U8.pack(kind)]

    def u8(self, value: int) -> None:
        self.parts.append(_U8.pack(value))

    def u16(self, value: int) -> None:
        self.parts.append(_U16.pack(value))

    def u32(self, value: int) -> None:
        self.parts.append(_U32.pack(value))

    def u64(self, value: int) -> None:
        self.parts.append(_U64.pack(value))

    def blob(self, value: bytes) -> None:
        self.parts += (_U32.pack(len(value)), value)

    def text(self, value: str) -> None:
        self.blob(value.encode("utf-8"))

    def blobs(self, values: tuple[bytes, ...]) -> None:
        self.u32(len(values))
        for value in values:
            self.blob(value)

    def optional(self, value: T | None, write: Callable[[T], None]) -> None:
        self.u8(value is not None)
        if value is not None:
            write(value)

    def bytes(self) -> bytes:
        return b"".join(self.parts)


def encode(message: Message) -> bytes:
    """The bytes of one message (``ValueError`` if a field is out of range)."""
    kind = Kind.SESSION if isinstance(message, SessionRecord) else _KIND_OF.get(type(message))
    if isinstance(message, Marker):
        kind = message.kind
    assert kind is not None
    writer = _Writer(kind)
    try:
        _ENCODERS[kind](writer, message)
    except struct.error as error:
        raise ValueError(f"cannot encode {kind.name}: {error}") from None
    data = writer.bytes()
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(f"{kind.name} of {len(data)} bytes, over {MAX_MESSAGE_BYTES}")
    return data


def _encode_hello(w: _Writer, m: Hello) -> None:
    w.u16(m.version)
    w.u32(m.pid)
    w.u16(m.processes)


def _encode_refused(w: _Writer, m: Refused) -> None:
    w.text(m.reason[:MAX_REASON_CHARS])


def _encode_listeners(w: _Writer, m: Listeners) -> None:
    w.u32(len(m.listeners))
    for listener in m.listeners:
        w.u8(listener.role)
        w.u16(listener.family)
        w.text(listener.host)
        w.u16(listener.port)


def _encode_key(w: _Writer, m: HasherKey) -> None:
    w.blob(m.key)


def _encode_route(w: _Writer, route: Route) -> None:
    w.text(route.host)
    w.u16(route.port)
    w.u8(_TLS_CODES[route.tls])
    w.optional(route.destuser, w.blob)
    w.optional(route.connect_timeout, w.u32)


def _encode_login(w: _Writer, login: LoginResult) -> None:
    w.blob(login.greeting_text)
    w.blobs(login.prelogin_capabilities)
    w.blob(login.reply)
    w.blobs(login.untagged)
    w.blobs(login.capabilities)


def _encode_entry(w: _Writer, entry: SelectEntry) -> None:
    w.blob(entry.mailbox)
    w.blob(entry.untagged)
    w.blob(entry.status_text)
    state = entry.state
    w.u64(state.exists)
    for figure in (state.uidnext, state.uidvalidity, state.first_unseen):
        w.optional(figure, w.u64)


def _encode_session(w: _Writer, m: SessionRecord) -> None:
    w.blob(m.username)
    w.blob(m.digest)
    w.optional(m.route, lambda route: _encode_route(w, route))
    _encode_login(w, m.login)
    w.optional(m.select_entry, lambda entry: _encode_entry(w, entry))
    w.u8(m.selected)
    w.optional(m.closed_line, w.blob)
    w.u32(m.remaining_ms)
    w.optional(m.origin_ip, w.text)
    w.text(m.server)
    w.text(m.backend_host)
    w.u16(m.backend_port)


def _encode_marker(w: _Writer, m: Marker) -> None:
    w.u64(m.count)


# -- decoding ---------------------------------------------------------------------------------


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def _take(self, count: int) -> bytes:
        if count > len(self.data) - self.at:
            raise TransferError("message cut short")
        chunk = self.data[self.at : self.at + count]
        self.at += count
        return chunk

    def u8(self) -> int:
        return int(self._take(1)[0])

    def u16(self) -> int:
        return int(_U16.unpack(self._take(2))[0])

    def u32(self) -> int:
        return int(_U32.unpack(self._take(4))[0])

    def u64(self) -> int:
        return int(_U64.unpack(self._take(8))[0])

    def flag(self) -> bool:
        value = self.u8()
        if value > 1:
            raise TransferError(f"flag byte {value}")
        return value == 1

    def blob(self) -> bytes:
        return self._take(self.u32())

    def text(self) -> str:
        try:
            return self.blob().decode("utf-8")
        except UnicodeDecodeError:
            raise TransferError("text not UTF-8") from None

    def blobs(self) -> tuple[bytes, ...]:
        count = self.u32()
        if count * 4 > len(self.data) - self.at:  # each takes 4 bytes at least
            raise TransferError("message cut short")
        return tuple(self.blob() for _ in range(count))

    def optional(self, read: Callable[[], T]) -> T | None:
        return read() if self.flag() else None

    def end(self) -> None:
        if self.at != len(self.data):
            raise TransferError(f"{len(self.data) - self.at} bytes after the message")


def decode(data: bytes) -> Message:
    """One whole message; ``TransferError`` (``VersionMismatch`` for a HELLO of another
    version) for anything else, trailing bytes included."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise TransferError(f"message of {len(data)} bytes, over {MAX_MESSAGE_BYTES}")
    reader = _Reader(data)
    if reader._take(len(MAGIC)) != MAGIC:
        raise TransferError("not a hand-over message")
    code = reader.u8()
    if code not in Kind._value2member_map_:
        raise TransferError(f"unknown message kind {code}")
    kind = Kind(code)
    message = _DECODERS[kind](reader, kind)
    reader.end()
    return message


def _decode_hello(r: _Reader, kind: Kind) -> Hello:
    version = r.u16()
    if version != FORMAT_VERSION:  # before reading on: the rest may be laid out otherwise
        raise VersionMismatch(version)
    pid = r.u32()
    processes = r.u16()
    if not 1 <= processes <= MAX_PROCESSES:
        raise TransferError(f"a hand-over from {processes} processes")
    return Hello(version, pid, processes)


def _decode_refused(r: _Reader, kind: Kind) -> Refused:
    return Refused(r.text()[:MAX_REASON_CHARS])


def _decode_listeners(r: _Reader, kind: Kind) -> Listeners:
    count = r.u32()
    if count * 9 > len(r.data) - r.at:  # each takes 9 bytes at least
        raise TransferError("message cut short")
    return Listeners(tuple(_decode_listener(r) for _ in range(count)))


def _decode_listener(r: _Reader) -> Listener:
    code = r.u8()
    if code not in ListenerRole._value2member_map_:
        raise TransferError(f"unknown listener role {code}")
    return Listener(ListenerRole(code), r.u16(), r.text(), r.u16())


def _decode_key(r: _Reader, kind: Kind) -> HasherKey:
    return HasherKey(r.blob())


def _decode_route(r: _Reader) -> Route:
    host, port, tls_code = r.text(), r.u16(), r.u8()
    if tls_code not in _TLS_MODES:
        raise TransferError(f"unknown TLS mode {tls_code}")
    return Route(host, port, _TLS_MODES[tls_code], r.optional(r.blob), r.optional(r.u32))


def _decode_login(r: _Reader) -> LoginResult:
    return LoginResult(r.blob(), r.blobs(), r.blob(), r.blobs(), r.blobs())


def _decode_entry(r: _Reader) -> SelectEntry:
    mailbox, untagged, status_text, exists = r.blob(), r.blob(), r.blob(), r.u64()
    state = MailboxState(exists, r.optional(r.u64), r.optional(r.u64), r.optional(r.u64))
    return SelectEntry(mailbox, untagged, status_text, state)


def _decode_session(r: _Reader, kind: Kind) -> SessionRecord:
    return SessionRecord(
        username=r.blob(),
        digest=r.blob(),
        route=r.optional(lambda: _decode_route(r)),
        login=_decode_login(r),
        select_entry=r.optional(lambda: _decode_entry(r)),
        selected=r.flag(),
        closed_line=r.optional(r.blob),
        remaining_ms=r.u32(),
        origin_ip=r.optional(r.text),
        server=r.text(),
        backend_host=r.text(),
        backend_port=r.u16(),
    )


def _decode_marker(r: _Reader, kind: Kind) -> Marker:
    return Marker(kind, r.u64())


_TLS_CODES: dict[TLSMode | None, int] = {
    None: 0,
    TLSMode.CLEAR: 1,
    TLSMode.STARTTLS: 2,
    TLSMode.IMPLICIT: 3,
}
_TLS_MODES = {code: mode for mode, code in _TLS_CODES.items()}
_KIND_OF: dict[type, Kind] = {
    Hello: Kind.HELLO,
    Refused: Kind.REFUSED,
    Listeners: Kind.LISTENERS,
    HasherKey: Kind.KEY,
}
_ENCODERS: dict[Kind, Callable[[_Writer, Message], None]] = {
    Kind.HELLO: _encode_hello,  # type: ignore[dict-item]
    Kind.REFUSED: _encode_refused,  # type: ignore[dict-item]
    Kind.LISTENERS: _encode_listeners,  # type: ignore[dict-item]
    Kind.KEY: _encode_key,  # type: ignore[dict-item]
    Kind.SESSION: _encode_session,  # type: ignore[dict-item]
    **dict.fromkeys(MARKERS, _encode_marker),  # type: ignore[arg-type]
}
_DECODERS: dict[Kind, Callable[[_Reader, Kind], Message]] = {
    Kind.HELLO: _decode_hello,
    Kind.REFUSED: _decode_refused,
    Kind.LISTENERS: _decode_listeners,
    Kind.KEY: _decode_key,
    Kind.SESSION: _decode_session,
    **dict.fromkeys(MARKERS, _decode_marker),
}


# -- the conversation's order, as the successor sees it ----------------------------------------


class Phase(enum.Enum):
    HELLO = "waiting for HELLO"
    LISTENERS = "waiting for LISTENERS"
    KEY = "waiting for KEY"
    CACHED = "receiving the cached sessions"
    LATE = "receiving sessions checked in late"
    DONE = "done"


_NEXT: dict[tuple[Phase, type], Phase] = {
    (Phase.HELLO, Hello): Phase.LISTENERS,
    (Phase.LISTENERS, Listeners): Phase.KEY,
    (Phase.KEY, HasherKey): Phase.CACHED,
    (Phase.CACHED, SessionRecord): Phase.CACHED,
    (Phase.LATE, SessionRecord): Phase.LATE,
}


class ReceiveOrder:
    """Checks that the running proxy's messages come in the conversation's order."""

    def __init__(self) -> None:
        self.phase = Phase.HELLO
        self.sessions = 0

    def receive(self, message: Message) -> Phase:
        """The phase after ``message``; ``TransferError`` if it does not belong here."""
        if isinstance(message, Refused):
            raise TransferError(f"refused: {message.reason}")
        following = _NEXT.get((self.phase, type(message)))
        if isinstance(message, Marker):
            following = self._after_marker(message)
        if following is None:
            raise TransferError(f"{type(message).__name__} while {self.phase.value}")
        self.sessions += isinstance(message, SessionRecord)
        self.phase = following
        return following

    def _after_marker(self, marker: Marker) -> Phase | None:
        if marker.kind is not Kind.READY and marker.count != self.sessions:
            raise TransferError(
                f"{marker.kind.name} says {marker.count} sessions, {self.sessions} came"
            )
        if (self.phase, marker.kind) == (Phase.CACHED, Kind.SENT):
            return Phase.LATE
        if (self.phase, marker.kind) == (Phase.LATE, Kind.END):
            return Phase.DONE
        return None

"""THE definition of the statistics file, shared by the proxy (writer) and pimpstat (reader).

Layout (native x86-64 / LP64, little-endian), bytes 0-71 exactly up-imapproxy 1.2.8's
``struct IMAPCounter`` so that Debian's ``pimpstat`` reads our file and ours reads its file::

    offset  type      field
     0      time_t    StartTime
     8      time_t    CountTime                      (last reset)
    16      unsigned  CurrentClientConnections
    20      unsigned  PeakClientConnections
    24      unsigned  InUseServerConnections
    28      unsigned  PeakInUseServerConnections
    32      unsigned  RetainedServerConnections
    36      unsigned  PeakRetainedServerConnections
    40      unsigned  TotalClientConnectionsAccepted
    44      unsigned  TotalClientLogins
    48      unsigned  TotalServerConnectionsCreated
    52      unsigned  TotalServerConnectionsReused
    56      unsigned  TotalSelectCommands
    60      unsigned  SelectCacheHits
    64      unsigned  SelectCacheMisses
    68      (4 bytes of padding: sizeof is 72)

Our extension follows, marked so that a reader can tell our file from up-imapproxy's::

    72      char[4]   b"IPXS"
    76      uint32    extension version (2)
    80      uint64    × EXTENSION_COUNT, in the order of ``EXTENSION_FIELDS``

Fields are only ever appended to the extension: a reader given a shorter file of ours (an
older version) reads the missing fields as 0. Version 1 had five counters (to byte 120);
version 2 adds a sixth (``BackendWaits``) and what is known of TLS with the IMAP server
(``tls_status``), for pimpstat::

   128      uint64    status: 0 not tried, 1 working, 2 failing
   136      uint64    since (time_t of the last change)
   144      char[248] one line: the reason and the setting to look at (UTF-8, NUL-padded)

A version-1 file reads as "not tried".

The writer updates fields in place (no locks, as up-imapproxy; single-threaded under gevent, so
our counters do not drift). The reader maps the file read-only.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Final

UP_IMAPPROXY_STRUCT: Final = struct.Struct("=qq13I4x")  # 72 bytes
UP_IMAPPROXY_SIZE: Final = UP_IMAPPROXY_STRUCT.size
EXTENSION_MAGIC: Final = b"IPXS"
EXTENSION_VERSION: Final = 2
_EXTENSION_HEADER: Final = struct.Struct("=4sI")
_EXTENSION_OFFSET: Final = UP_IMAPPROXY_SIZE + _EXTENSION_HEADER.size  # 80
EXTENSION_COUNT: Final = 6
_STATUS_OFFSET: Final = _EXTENSION_OFFSET + 8 * EXTENSION_COUNT  # 128
_STATUS_TEXT_OFFSET: Final = _STATUS_OFFSET + 16
STATUS_TEXT_BYTES: Final = 248
FILE_SIZE: Final = _STATUS_TEXT_OFFSET + STATUS_TEXT_BYTES  # 392

assert UP_IMAPPROXY_SIZE == 72


class _Field:
    """One counter: element ``index`` of the view named ``area`` (``_times``, ``_counts``, ...)."""

    def __init__(self, area: str, index: int) -> None:
        self.area, self.index = area, index

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, counters: Counters, owner: type | None = None) -> int:
        return int(getattr(counters, self.area)[self.index])

    def __set__(self, counters: Counters, value: int) -> None:
        getattr(counters, self.area)[self.index] = value


class Counters:
    """Named access to the counters in a buffer of ``FILE_SIZE`` bytes (an mmap or bytearray)."""

    StartTime = _Field("_times", 0)
    CountTime = _Field("_times", 1)
    CurrentClientConnections = _Field("_counts", 0)
    PeakClientConnections = _Field("_counts", 1)
    InUseServerConnections = _Field("_counts", 2)
    PeakInUseServerConnections = _Field("_counts", 3)
    RetainedServerConnections = _Field("_counts", 4)
    PeakRetainedServerConnections = _Field("_counts", 5)
    TotalClientConnectionsAccepted = _Field("_counts", 6)
    TotalClientLogins = _Field("_counts", 7)
    TotalServerConnectionsCreated = _Field("_counts", 8)
    TotalServerConnectionsReused = _Field("_counts", 9)
    TotalSelectCommands = _Field("_counts", 10)
    SelectCacheHits = _Field("_counts", 11)
    SelectCacheMisses = _Field("_counts", 12)
    # the extension (version 1)
    TotalLoginFailures = _Field("_extension", 0)  # logins the backend (or the proxy) refused
    TotalServerConnectionsExpired = _Field("_extension", 1)  # by cache_expiration_time
    TotalServerConnectionsDropped = _Field("_extension", 2)  # closed, not cached (dead, desync)
    TotalClientAbortsResynced = _Field("_extension", 3)  # vanished clients whose session was kept
    TotalCapacityRefusals = _Field("_extension", 4)  # logins refused: every slot in use
    # times a client waited for the server: a command's round trip, or a reuse check whose
    # reply had not come in by the client's next command (``bench`` divides it by pages)
    BackendWaits = _Field("_extension", 5)

    def __init__(self, buffer: mmap.mmap | bytearray) -> None:
        self.buffer = buffer
        view = memoryview(buffer)
        self._times = view[0:16].cast("q")
        self._counts = view[16:68].cast("I")
        self._extension = view[_EXTENSION_OFFSET:_STATUS_OFFSET].cast("Q")
        self._status = view[_STATUS_OFFSET:_STATUS_TEXT_OFFSET].cast("Q")

    def release(self) -> None:
        for view in (self._times, self._counts, self._extension, self._status):
            view.release()

    def set_backend_tls(self, code: int, since: int, text: str) -> None:
        """What is known of TLS with the IMAP server (``tls_status``), for pimpstat."""
        data = text.encode("utf-8")[:STATUS_TEXT_BYTES].decode("utf-8", "ignore").encode()
        self.buffer[_STATUS_TEXT_OFFSET:FILE_SIZE] = data.ljust(STATUS_TEXT_BYTES, b"\0")
        self._status[0], self._status[1] = code, since

    def backend_tls(self) -> tuple[int, int, str]:
        """(status code, since, text); (0, 0, "") in a file before version 2."""
        magic, version = _EXTENSION_HEADER.unpack_from(self.buffer, UP_IMAPPROXY_SIZE)
        if magic != EXTENSION_MAGIC or version < 2:
            return 0, 0, ""
        text = bytes(self.buffer[_STATUS_TEXT_OFFSET:FILE_SIZE]).rstrip(b"\0")
        return int(self._status[0]), int(self._status[1]), text.decode("utf-8", "replace")

    @classmethod
    def in_memory(cls) -> Counters:
        counters = cls(bytearray(FILE_SIZE))
        counters.mark_extension()
        return counters

    def mark_extension(self) -> None:
        _EXTENSION_HEADER.pack_into(
            self.buffer, UP_IMAPPROXY_SIZE, EXTENSION_MAGIC, EXTENSION_VERSION
        )

    def has_extension(self) -> bool:
        if len(self.buffer) < FILE_SIZE:
            return False
        magic, version = _EXTENSION_HEADER.unpack_from(self.buffer, UP_IMAPPROXY_SIZE)
        return bool(magic == EXTENSION_MAGIC and version >= 1)  # the counters came in 1

    def snapshot(self) -> dict[str, int]:
        names = TIME_FIELDS + COUNTER_FIELDS + (EXTENSION_FIELDS if self.has_extension() else ())
        return {name: getattr(self, name) for name in names}

    # -- changes that keep the peaks ------------------------------------------------------------

    def client_connected(self) -> None:
        self.TotalClientConnectionsAccepted += 1
        self.CurrentClientConnections += 1
        self.PeakClientConnections = max(self.PeakClientConnections, self.CurrentClientConnections)

    def client_disconnected(self) -> None:
        self.CurrentClientConnections -= 1

    def set_server_connections(self, active: int, cached: int) -> None:
        """The gauges of the cache, set at every checkout and checkin: on the view directly
        (the four fields are ``_counts`` 2 to 5), not through four descriptors."""
        counts = self._counts
        counts[2], counts[4] = active, cached
        if active > counts[3]:
            counts[3] = active
        if cached > counts[5]:
            counts[5] = cached

    def start(self, now: int) -> None:
        """Zero the counters and stamp the start (proxy start-up); the TLS status, found by
        the start-up contact with the server, stays."""
        self.buffer[:_STATUS_OFFSET] = bytes(_STATUS_OFFSET)
        self.mark_extension()
        self.StartTime = self.CountTime = now

    def reset(self, now: int) -> None:
        """XPROXY_RESETCOUNTERS, as up-imapproxy: peaks and totals, not gauges or SELECT counts."""
        self.CountTime = now
        self.PeakClientConnections = self.CurrentClientConnections
        self.PeakInUseServerConnections = self.InUseServerConnections
        self.PeakRetainedServerConnections = self.RetainedServerConnections
        for name in (
            "TotalClientConnectionsAccepted",
            "TotalServerConnectionsCreated",
            "TotalServerConnectionsReused",
            "TotalClientLogins",
        ):
            setattr(self, name, 0)


_GAUGE_FIELDS = (
    "InUseServerConnections",
    "PeakInUseServerConnections",
    "RetainedServerConnections",
    "PeakRetainedServerConnections",
)
assert [vars(Counters)[name].index for name in _GAUGE_FIELDS] == [2, 3, 4, 5]


def _names(area: str) -> tuple[str, ...]:
    fields = [f for f in vars(Counters).values() if isinstance(f, _Field) and f.area == area]
    return tuple(f.name for f in sorted(fields, key=lambda f: f.index))


TIME_FIELDS: Final = _names("_times")
COUNTER_FIELDS: Final = _names("_counts")  # up-imapproxy's order
EXTENSION_FIELDS: Final = _names("_extension")
assert len(TIME_FIELDS) == 2 and len(COUNTER_FIELDS) == 13
assert len(EXTENSION_FIELDS) == EXTENSION_COUNT


def summary(counters: Counters) -> str:
    """One line of the counters, for the log on SIGUSR1."""
    c = counters
    return (
        f"clients {c.CurrentClientConnections} (peak {c.PeakClientConnections}), "
        f"active {c.InUseServerConnections} (peak {c.PeakInUseServerConnections}), "
        f"cached {c.RetainedServerConnections} (peak {c.PeakRetainedServerConnections}), "
        f"accepted {c.TotalClientConnectionsAccepted}, logins {c.TotalClientLogins}, "
        f"created {c.TotalServerConnectionsCreated}, reused {c.TotalServerConnectionsReused}, "
        f"selects {c.TotalSelectCommands} (hits {c.SelectCacheHits}, "
        f"misses {c.SelectCacheMisses}), login failures {c.TotalLoginFailures}, "
        f"expired {c.TotalServerConnectionsExpired}, dropped {c.TotalServerConnectionsDropped}, "
        f"resynced {c.TotalClientAbortsResynced}, refused {c.TotalCapacityRefusals}"
    )


def create_file(path: str) -> Counters:
    """Create (or truncate) the statistics file, mode 0600, and map it for writing."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, FILE_SIZE)
        buffer = mmap.mmap(fd, FILE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    return Counters(buffer)


def read_file(path: str) -> Counters | None:
    """A snapshot of a statistics file (``read_file_or_reason``), None if it cannot be read."""
    counters = read_file_or_reason(path)
    return counters if isinstance(counters, Counters) else None


def read_file_or_reason(path: str) -> Counters | str:
    """A snapshot of a statistics file (ours or up-imapproxy's), or why there is none (missing,
    unreadable, short). Readers take a fresh snapshot per refresh: a live map of a file that
    shrinks under it would fault (SIGBUS).

    A file of at least 72 bytes is readable; the extension counters read as 0 without it.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as error:
        return error.strerror or str(error)
    try:
        size = os.fstat(fd).st_size
        if size < UP_IMAPPROXY_SIZE:
            return f"{size} bytes, shorter than a statistics file ({UP_IMAPPROXY_SIZE} bytes)"
        mapped = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)
    buffer = bytearray(FILE_SIZE)
    buffer[: min(size, FILE_SIZE)] = mapped[: min(size, FILE_SIZE)]
    mapped.close()
    return Counters(buffer)

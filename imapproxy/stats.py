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

With ``workers N`` (N > 1) the file goes on after byte 392: the 392 bytes above are then the
TOTALS of every worker (what Debian's ``pimpstat -c`` reads), written by the supervisor's
``Totals.update()``, and a worker table follows, found by its magic (the meaning of no
existing byte changes, so the extension version stays 2)::

   392      char[4]   b"IPXW"
   396      uint32    worker count N
   400      uint64    WorkerRestarts: workers the supervisor restarted after they died
   408      uint64    (reserved, 0)
   416      392 bytes RETIRED: a block laid out as a whole version-2 file, the sum of the
                      counters of worker processes that have exited (gauges 0), so that the
                      totals do not fall when a worker is replaced
   808      N × 408-byte worker slots; slot i at 808 + 408 i:
              +0    uint64    pid of the worker process in the slot (0: none)
              +8    uint64    restarts of this slot
              +16   392 bytes the worker's block, laid out as a whole version-2 file: its own
                              counters (StartTime: when this process started), written by it

A worker writes only its own block (``Counters.worker(i)``, a view of the shared map); the
totals are sums of the retired block and the worker blocks, except the peaks: the totals keep
the peak of the sum as sampled (a peak of sums is not a sum of peaks), restarted from the
current sums by a reset. A reader sums the blocks itself (``Counters.summed()``), so it shows
current figures, not the supervisor's last sample.

The writer updates fields in place (no locks, as up-imapproxy; single-threaded under gevent, so
our counters do not drift; with workers, one writer per block). The reader maps the file
read-only.
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

WORKER_TABLE_MAGIC: Final = b"IPXW"
_WORKER_TABLE_HEADER: Final = struct.Struct("=4sIQQ")  # magic, count, restarts, reserved
_RESTARTS_OFFSET: Final = FILE_SIZE + 8  # 400
RETIRED_OFFSET: Final = FILE_SIZE + _WORKER_TABLE_HEADER.size  # 416
_WORKER_SLOT_HEADER: Final = struct.Struct("=QQ")  # pid, restarts of the slot
WORKER_SLOT_SIZE: Final = _WORKER_SLOT_HEADER.size + FILE_SIZE  # 408
FIRST_SLOT_OFFSET: Final = RETIRED_OFFSET + FILE_SIZE  # 808
MAX_WORKERS: Final = 1024  # a sanity bound for a reader of a damaged file

_COUNTS: Final = struct.Struct("=13I")  # bytes 16-67
_EXTENSION: Final = struct.Struct(f"={EXTENSION_COUNT}Q")
_COUNT_MASK: Final = (1 << 32) - 1  # C's unsigned wraps
_EXTENSION_MASK: Final = (1 << 64) - 1

Buffer = mmap.mmap | bytearray | memoryview

assert UP_IMAPPROXY_SIZE == 72
assert RETIRED_OFFSET == 416 and FIRST_SLOT_OFFSET == 808 and WORKER_SLOT_SIZE == 408


def file_size(workers: int) -> int:
    """The size of a file for ``workers`` processes: 392 bytes for one, as before workers."""
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers must be 1 to {MAX_WORKERS}, not {workers}")
    return FILE_SIZE if workers == 1 else FIRST_SLOT_OFFSET + workers * WORKER_SLOT_SIZE


def worker_block_offset(index: int) -> int:
    """Where worker ``index``'s block (a whole version-2 layout) starts in the file."""
    return FIRST_SLOT_OFFSET + index * WORKER_SLOT_SIZE + _WORKER_SLOT_HEADER.size


class _Field:
    """One counter: element ``index`` of the view named ``area`` (``_times``, ``_counts``, ...)."""

    def __init__(self, area: str, index: int) -> None:
        self.area, self.index = area, index

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, counters: Counters, owner: type | None = None) -> int:
        value: int = getattr(counters, self.area)[self.index]  # a view's item is an int
        return value

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

    def __init__(self, buffer: Buffer) -> None:
        self.buffer = buffer
        view = memoryview(buffer)
        self._times = view[0:16].cast("q")
        self._counts = view[16:68].cast("I")
        self._extension = view[_EXTENSION_OFFSET:_STATUS_OFFSET].cast("Q")
        self._status = view[_STATUS_OFFSET:_STATUS_TEXT_OFFSET].cast("Q")

    def release(self) -> None:
        """Let go of the views, so that the map can be closed (a block's too: ``worker``)."""
        for view in (self._times, self._counts, self._extension, self._status):
            view.release()
        if isinstance(self.buffer, memoryview):
            self.buffer.release()

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
    def in_memory(cls, workers: int = 1) -> Counters:
        """Counters without a file (no ``stat_filename``); for workers, an anonymous shared
        map, which processes forked after share (not across ``exec``)."""
        if workers == 1:
            counters = cls(bytearray(FILE_SIZE))
            counters.mark_extension()
            return counters
        counters = cls(mmap.mmap(-1, file_size(workers)))  # MAP_SHARED | MAP_ANONYMOUS
        counters.mark_worker_table(workers)
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

    # -- the worker table (``workers N``) ------------------------------------------------------

    def mark_worker_table(self, workers: int) -> None:
        """Write the table's header and mark every block (a new file of ``file_size(workers)``)."""
        _WORKER_TABLE_HEADER.pack_into(self.buffer, FILE_SIZE, WORKER_TABLE_MAGIC, workers, 0, 0)
        self.mark_extension()
        for offset in [RETIRED_OFFSET, *map(worker_block_offset, range(workers))]:
            _EXTENSION_HEADER.pack_into(
                self.buffer, offset + UP_IMAPPROXY_SIZE, EXTENSION_MAGIC, EXTENSION_VERSION
            )

    def worker_count(self) -> int:
        """The workers in the table; 0 without one (one process, or up-imapproxy's file).
        A count the file is too short for is cut to the slots it holds."""
        if len(self.buffer) < FIRST_SLOT_OFFSET or not self.has_extension():
            return 0
        magic, count, _, _ = _WORKER_TABLE_HEADER.unpack_from(self.buffer, FILE_SIZE)
        if magic != WORKER_TABLE_MAGIC:
            return 0
        room = (len(self.buffer) - FIRST_SLOT_OFFSET) // WORKER_SLOT_SIZE
        return int(min(count, room, MAX_WORKERS))

    def worker(self, index: int) -> Counters:
        """Worker ``index``'s own counters: a view of its block in the same buffer (for a
        map, the shared one), used with every method of ``Counters``. ``release()`` it."""
        return Counters(self._block(self._slot(index) + _WORKER_SLOT_HEADER.size))

    def retired(self) -> Counters:
        """The counters of the worker processes that have exited (``Totals.worker_exited``)."""
        if not self.worker_count():
            raise ValueError("no worker table in this statistics file")
        return Counters(self._block(RETIRED_OFFSET))

    def _block(self, offset: int) -> memoryview:
        return memoryview(self.buffer)[offset : offset + FILE_SIZE]

    def _slot(self, index: int) -> int:
        """The offset of slot ``index``'s header, checked against the table."""
        if not 0 <= index < self.worker_count():
            raise IndexError(f"no worker {index} in a table of {self.worker_count()}")
        return FIRST_SLOT_OFFSET + index * WORKER_SLOT_SIZE

    @property
    def WorkerRestarts(self) -> int:
        """Workers restarted by the supervisor after they died; 0 without a worker table."""
        if not self.worker_count():
            return 0
        return int(struct.unpack_from("=Q", self.buffer, _RESTARTS_OFFSET)[0])

    @WorkerRestarts.setter
    def WorkerRestarts(self, value: int) -> None:
        if not self.worker_count():
            raise ValueError("no worker table in this statistics file")
        struct.pack_into("=Q", self.buffer, _RESTARTS_OFFSET, value)

    def worker_pid(self, index: int) -> int:
        """The pid of the process in slot ``index`` (0: none), as the supervisor set it."""
        return int(_WORKER_SLOT_HEADER.unpack_from(self.buffer, self._slot(index))[0])

    def set_worker_pid(self, index: int, pid: int) -> None:
        offset = self._slot(index)
        struct.pack_into("=Q", self.buffer, offset, pid)

    def worker_restarts(self, index: int) -> int:
        """How many times the supervisor restarted the worker of slot ``index``."""
        return int(_WORKER_SLOT_HEADER.unpack_from(self.buffer, self._slot(index))[1])

    def count_worker_restart(self, index: int) -> None:
        """A worker died and is being replaced: counted for its slot and in WorkerRestarts."""
        offset = self._slot(index) + 8
        struct.pack_into("=Q", self.buffer, offset, self.worker_restarts(index) + 1)
        self.WorkerRestarts += 1

    def worker_snapshots(self) -> list[dict[str, int]]:
        """Each worker's ``snapshot()``, with its ``WorkerPid`` and ``WorkerRestarts``."""
        rows = []
        for index in range(self.worker_count()):
            block = self.worker(index)
            row = block.snapshot()
            block.release()
            row["WorkerPid"] = self.worker_pid(index)
            row["WorkerRestarts"] = self.worker_restarts(index)
            rows.append(row)
        return rows

    def summed(self) -> dict[str, int]:
        """The totals of the whole proxy: ``snapshot()`` for one process; with a worker table,
        the exact sums of the retired and worker blocks (this reading, not the supervisor's
        last sample), the peaks no lower than the current sums, and ``WorkerCount`` and
        ``WorkerRestarts``."""
        totals = self.snapshot()
        count = self.worker_count()
        if not count:
            return totals
        columns = _Columns(self)
        counts, extension = columns.sums()
        columns.release()
        totals.update(zip(COUNTER_FIELDS, counts, strict=True))
        totals.update(zip(EXTENSION_FIELDS, extension, strict=True))
        for current, peak in _GAUGE_PAIRS:
            totals[peak] = max(getattr(self, peak), totals[current])
        totals["WorkerCount"], totals["WorkerRestarts"] = count, self.WorkerRestarts
        return totals

    # -- changes that keep the peaks ------------------------------------------------------------

    # The counts a webmail page moves, on the views directly (``_counts`` 0, 1, 6, 7 and 9,
    # ``_extension`` 5): one call each, not a descriptor's two for every ``+= 1``.

    def client_connected(self) -> None:
        counts = self._counts
        counts[6] += 1  # TotalClientConnectionsAccepted
        self.client_arrived()

    def client_arrived(self) -> None:
        """A client handed over by another worker (``workers N``): connected here, but
        accepted (and counted as accepted) there."""
        counts = self._counts
        current = counts[0] = counts[0] + 1  # CurrentClientConnections
        if current > counts[1]:  # PeakClientConnections
            counts[1] = current

    def client_disconnected(self) -> None:
        self._counts[0] -= 1

    def login_requested(self) -> None:
        self._counts[7] += 1  # TotalClientLogins

    def session_reused(self, count: int = 1) -> None:
        """``count`` more (or, -1, one fewer: its check failed) ``TotalServerConnectionsReused``."""
        self._counts[9] += count

    def backend_waited(self) -> None:
        self._extension[5] += 1  # BackendWaits

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
        """XPROXY_RESETCOUNTERS, as up-imapproxy: peaks and totals, not gauges or SELECT counts.
        On a file with a worker table, every block: the totals, the retired block and each
        worker's (a worker counting at that instant may keep one count it made)."""
        count = self.worker_count()
        blocks = [self.retired(), *map(self.worker, range(count))] if count else []
        for block in blocks:
            block.reset(now)
            block.release()
        self._reset_block(now)

    def _reset_block(self, now: int) -> None:
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


_GAUGE_PAIRS: Final = (  # (current, peak)
    ("CurrentClientConnections", "PeakClientConnections"),
    ("InUseServerConnections", "PeakInUseServerConnections"),
    ("RetainedServerConnections", "PeakRetainedServerConnections"),
)
_PEAK_INDEXES: Final = ((0, 1), (2, 3), (4, 5))  # the same, as indexes of ``_counts``


def workers_summary(counters: Counters) -> str:
    """One line of each worker's figures, for the log on SIGUSR1 beside ``summary`` (empty
    without a worker table)."""
    if not counters.worker_count():
        return ""
    parts = [
        f"worker {index} pid {row['WorkerPid']}: clients {row['CurrentClientConnections']}, "
        f"active {row['InUseServerConnections']}, cached {row['RetainedServerConnections']}, "
        f"logins {row['TotalClientLogins']}, reused {row['TotalServerConnectionsReused']}"
        for index, row in enumerate(counters.worker_snapshots())
    ]
    return f"workers restarted {counters.WorkerRestarts}; " + "; ".join(parts)


class _Columns:
    """Each field across the retired block and every worker block, as strided views of the
    buffer (the blocks lie ``WORKER_SLOT_SIZE`` apart from ``RETIRED_OFFSET``): a sum is one
    ``sum()`` per field, a few microseconds for the whole table."""

    def __init__(self, counters: Counters) -> None:
        count = counters.worker_count()
        if not count:
            raise ValueError("no worker table in this statistics file")
        end = FIRST_SLOT_OFFSET + count * WORKER_SLOT_SIZE
        region = memoryview(counters.buffer)[RETIRED_OFFSET:end]
        as_u32, as_u64, as_i64 = region.cast("I"), region.cast("Q"), region.cast("q")
        u32, u64 = WORKER_SLOT_SIZE // 4, WORKER_SLOT_SIZE // 8  # the stride in each unit
        self.counts = [as_u32[4 + k :: u32] for k in range(13)]  # bytes 16-67 of each block
        extension = _EXTENSION_OFFSET // 8
        self.extension = [as_u64[extension + k :: u64] for k in range(EXTENSION_COUNT)]
        self.start_times, self.count_times = as_i64[0::u64], as_i64[1::u64]
        self.tls_since = as_u64[_STATUS_OFFSET // 8 + 1 :: u64]
        self._views = [region, as_u32, as_u64, as_i64]

    def sums(self) -> tuple[list[int], list[int]]:
        """The 13 up-imapproxy counters and the extension counters summed, wrapped as the
        file's unsigned fields wrap (the peaks are summed too: callers replace them)."""
        return (
            [sum(column) & _COUNT_MASK for column in self.counts],
            [sum(column) & _EXTENSION_MASK for column in self.extension],
        )

    def release(self) -> None:
        columns = [*self.counts, *self.extension, self.start_times, self.count_times]
        for view in [*columns, self.tls_since, *reversed(self._views)]:
            view.release()


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


BlockTimes = tuple[list[int], list[int]]  # the StartTime and the CountTime of each block


def _latest_reset(before: BlockTimes, after: BlockTimes) -> int:
    """The latest CountTime that moved in a block whose StartTime did not (a reset, not a new
    process in the slot); 0 if none."""
    moved = zip(*before, *after, strict=True)
    resets = [now for was, then, is_, now in moved if was == is_ and now > then]
    return max(resets, default=0)


class Totals:
    """The supervisor's summer: writes into the totals block (bytes 0-391, what up-imapproxy's
    ``pimpstat -c`` reads) the sums of the retired and the worker blocks.

    Counters and gauges are summed; each peak is the peak of the sum as sampled by ``update``,
    restarted from the current sums when the counters were reset (a reset is a newer CountTime
    in a block whose StartTime did not change: a worker's own start is no reset, and the
    retired block keeps the totals from falling). StartTime is the supervisor's (``start``),
    CountTime the last reset; the TLS status is that of the block whose status changed last.

    Measured (``python -m timeit``, 2-core machine): ``update()`` 4.3 µs with 2 workers, 5.6 µs
    with 8; a reader's ``summed()`` 17 µs.
    """

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self._columns = _Columns(counters)
        self.retired = counters.retired()
        self.workers = [counters.worker(index) for index in range(counters.worker_count())]
        self._seen = self._times()

    def start(self, now: int) -> None:
        """The supervisor starts: totals and retired counters zeroed, stamped ``now``; no
        restarts yet. The TLS status stays (``Counters.start``)."""
        for block in (self.counters, self.retired):
            block.start(now)
        self.counters.WorkerRestarts = 0
        self._seen = self._times()

    def update(self) -> None:
        """Sum the blocks into the totals block (cheap: the supervisor calls it often)."""
        reset_at = self._reset_time()  # first: it may reset the retired block
        counts, extension = self._columns.sums()
        total = self.counters
        for current, peak in _PEAK_INDEXES:
            before = 0 if reset_at else total._counts[peak]
            counts[peak] = max(before, counts[current])
        _COUNTS.pack_into(total.buffer, 16, *counts)
        _EXTENSION.pack_into(total.buffer, _EXTENSION_OFFSET, *extension)
        if reset_at > total.CountTime:
            total.CountTime = reset_at
        self._copy_latest_tls()

    def _times(self) -> BlockTimes:
        """(StartTime, CountTime) of the retired block and each worker block, in that order."""
        return self._columns.start_times.tolist(), self._columns.count_times.tolist()

    def _reset_time(self) -> int:
        """The latest reset in any block since the last update (0 if none). A reset of one
        block (XPROXY_RESETCOUNTERS in a worker that reset only its own) is carried to every
        block counted before it, the retired one too, as ``Counters.reset`` on the whole file
        does at once."""
        times = self._times()
        if times == self._seen:
            return 0
        reset_at, self._seen = _latest_reset(self._seen, times), times
        behind = [block for block in [self.retired, *self.workers] if block.CountTime < reset_at]
        for block in behind:
            block.reset(reset_at)
        if behind:
            self._seen = self._times()
        return reset_at

    def _copy_latest_tls(self) -> None:
        since = self._columns.tls_since.tolist()[1:]  # the retired block has no TLS status
        latest = max(range(len(since)), key=since.__getitem__)
        total = self.counters
        if since[latest] > total._status[1]:
            status = self.workers[latest].buffer[_STATUS_OFFSET:FILE_SIZE]
            total.buffer[_STATUS_OFFSET:FILE_SIZE] = status

    def worker_exited(self, index: int) -> None:
        """Worker ``index`` died (or stopped): its counters move into the retired block and its
        block is zeroed, pid 0, before a successor starts in the slot. Call it after the
        process is reaped, so that nothing writes the block any more."""
        block, retired = self.workers[index], self.retired
        counts = [
            (a + b) & _COUNT_MASK for a, b in zip(retired._counts, block._counts, strict=True)
        ]
        extension = [
            (a + b) & _EXTENSION_MASK
            for a, b in zip(retired._extension, block._extension, strict=True)
        ]
        for current, peak in _PEAK_INDEXES:  # a process that is gone holds nothing
            counts[current] = counts[peak] = 0
        block.buffer[:_STATUS_OFFSET] = bytes(_STATUS_OFFSET)  # first: never counted twice
        block.mark_extension()
        _COUNTS.pack_into(retired.buffer, 16, *counts)
        _EXTENSION.pack_into(retired.buffer, _EXTENSION_OFFSET, *extension)
        self.counters.set_worker_pid(index, 0)
        self.update()

    def release(self) -> None:
        for block in [self.retired, *self.workers]:
            block.release()
        self._columns.release()


def create_file(path: str, workers: int = 1) -> Counters:
    """Create (or truncate) the statistics file, mode 0600, and map it for writing; for
    ``workers`` > 1 with its worker table (a map shared with the processes forked after)."""
    size = file_size(workers)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        buffer = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    counters = Counters(buffer)
    if workers > 1:
        counters.mark_worker_table(workers)
    return counters


def read_file(path: str) -> Counters | None:
    """A snapshot of a statistics file (``read_file_or_reason``), None if it cannot be read."""
    counters = read_file_or_reason(path)
    return counters if isinstance(counters, Counters) else None


def read_file_or_reason(path: str) -> Counters | str:
    """A snapshot of a statistics file (ours or up-imapproxy's), or why there is none (missing,
    unreadable, short). Readers take a fresh snapshot per refresh: a live map of a file that
    shrinks under it would fault (SIGBUS).

    A file of at least 72 bytes is readable; the extension counters read as 0 without it. The
    whole file is read, its worker table too (up to ``MAX_WORKERS`` slots).
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
    length = min(size, file_size(MAX_WORKERS))
    buffer = bytearray(max(length, FILE_SIZE))
    buffer[:length] = mapped[:length]
    mapped.close()
    return Counters(buffer)

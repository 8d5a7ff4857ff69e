"""pimpstat's views, pure: statistics snapshots in, screen rows out.

No curses, no I/O, no clock. The caller passes one or two snapshots (a ``dict`` from
``Counters.snapshot()``, or the ``Counters`` itself), the seconds between them, and the function
that breaks a ``time_t`` into local time (``time.localtime``). ``pimpstat.app`` draws the rows.

The views:

* ``counters``: up-imapproxy 1.2.8's pimpstat screen with its sections, wording and formats
  (numbers ``%9d``, times as ``ctime()`` without the newline, the login ratio ``%9.2f : 1`` or
  ``N/A``, ``SELECT CACHE NOT ENABLED``), then our extension counters when the file has them.
* ``rates``: what up-imapproxy lacks: per-second rates of the ``Total*`` counters (and the
  SELECT ones) over the last interval, and the hit ratios.
* ``about``: the program, its files and its keys.
* ``servers``: each IMAP server's health (the servers file beside the statistics file).
* ``workers``: with ``workers N``, one row per worker process (its pid, gauges, logins, reuses,
  hit ratio and restarts) and the totals; a file without a worker table says so.

With a worker table the snapshot is ``Counters.summed()``: the exact totals of every worker.

``command_line_text`` is ``pimpstat -c``: up-imapproxy's 12 lines, byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from imapproxy.health import ServerLine, State
from imapproxy.stats import EXTENSION_FIELDS

Snapshot = Mapping[str, int]
LocalTime = Callable[[int], Sequence[int]]  # time.localtime: year, month, mday, h, m, s, wday


class HasSnapshot(Protocol):
    def snapshot(self) -> dict[str, int]: ...


Source = Snapshot | HasSnapshot

VIEWS: Final = ("counters", "rates", "about", "servers", "workers")
VIEW_TITLES: Final = {
    "counters": "up-imapproxy's figures",
    "rates": "per second, and hit ratios",
    "about": "files, format and keys",
    "servers": "each IMAP server's health",
    "workers": "each worker process",
}
KEYS: Final = (("q", "quit"), ("r", "redraw"), ("m", "menu: choose the view"))

RowKind = Literal["heading", "text", "field", "info", "time", "blank"]


@dataclass(frozen=True)
class Row:
    """One screen line.

    ``heading`` and ``text`` rows have only a label (a heading is emphasised); a ``field`` has a
    label and a figure (drawn right-aligned), and ``beside`` is an optional second label and
    figure in the right column (up-imapproxy's "peak:" next to "current:"); an ``info`` row has
    a label and a text (drawn left-aligned); a ``time`` row is a labelled time (up-imapproxy
    right-aligns those labels); a ``blank`` row is empty.
    """

    label: str = ""
    value: str = ""
    kind: RowKind = "field"
    beside: tuple[str, str] | None = None


BLANK: Final = Row(kind="blank")


def heading(text: str) -> Row:
    return Row(text, kind="heading")


def as_snapshot(source: Source) -> dict[str, int]:
    """A ``dict`` of the counters; a ``Counters`` is asked for its ``snapshot()``."""
    if isinstance(source, Mapping):
        return dict(source)
    return source.snapshot()


def has_extension(snapshot: Snapshot) -> bool:
    """Our extension counters are in a snapshot only when the file has them (not up-imapproxy's)."""
    return all(name in snapshot for name in EXTENSION_FIELDS)


# -- formats ------------------------------------------------------------------------------------

_DAYS: Final = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")  # tm_wday: Monday is 0
_MONTHS: Final = ("Jan", "Feb", "Mar", "Apr", "May", "Jun") + (
    "Jul",
    "Aug",
    "Sep",
    "Oct",
    "Nov",
    "Dec",
)


def ctime_text(tm: Sequence[int]) -> str:
    """C's ``ctime()`` without its newline: ``Www Mmm dd hh:mm:ss yyyy``, the day space-padded."""
    year, month, mday, hour, minute, second, wday = tm[:7]
    clock = f"{hour:02d}:{minute:02d}:{second:02d}"
    return f"{_DAYS[wday]} {_MONTHS[month - 1]} {mday:2d} {clock} {year}"


def time_text(seconds: int, localtime: LocalTime) -> str:
    """A ``time_t`` from the file as ctime text; a value local time cannot represent is shown."""
    try:
        return ctime_text(localtime(seconds))
    except (OverflowError, OSError, ValueError):
        return f"(invalid time {seconds})"


def number_text(value: int) -> str:
    """up-imapproxy's ``%9d`` (but unsigned: a counter past 2**31 does not turn negative)."""
    return f"{value:9d}"


def c_int(value: int) -> int:
    """What C's ``%d`` prints for an ``unsigned`` counter: 2**31 and above wrap to negative."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def ratio_text(logins: int, created: int) -> str:
    """The login ratio as up-imapproxy: ``%9.2f : 1``, or ``N/A`` when nothing was created."""
    if created == 0:
        return "          N/A"
    return f"{logins / created:9.2f} : 1"


def percent_text(part: int, whole: int) -> str:
    """``part / whole`` as a percentage with one decimal, or ``N/A`` when ``whole`` is 0."""
    if whole == 0:
        return "N/A"
    return f"{100 * part / whole:.1f} %"


def rate_text(rate: float | None) -> str:
    """A rate per second with two decimals, or ``N/A`` when there is none."""
    return "N/A" if rate is None else f"{rate:9.2f} /s"


# -- pimpstat -c --------------------------------------------------------------------------------

COMMAND_LINE_FIELDS: Final = (
    ("CurrentClientConnections", "Current Client Connections"),
    ("PeakClientConnections", "Peak Client Connections"),
    ("InUseServerConnections", "In Use Connections"),
    ("PeakInUseServerConnections", "Peak In Use Connections"),
    ("RetainedServerConnections", "Retained Server Connections"),
    ("PeakRetainedServerConnections", "Peak Retained Server Connections"),
    ("TotalClientConnectionsAccepted", "Total Client Connections"),
    ("TotalClientLogins", "Total Client Logins"),
    ("TotalServerConnectionsReused", "Total Reused Connections"),  # Reused before Created,
    ("TotalServerConnectionsCreated", "Total Created Connections"),  # as up-imapproxy prints
    ("SelectCacheHits", "Cache Hits"),
    ("SelectCacheMisses", "Cache Misses"),
)


def command_line_text(source: Source) -> str:
    """``pimpstat -c``: up-imapproxy's 12 lines `` %d <label>``, byte for byte (``c_int``).

    Only up-imapproxy's counters: scripts parse this output, so it does not grow.
    """
    snapshot = as_snapshot(source)
    return "".join(
        f" {c_int(snapshot.get(name, 0))} {label}\n" for name, label in COMMAND_LINE_FIELDS
    )


# -- counters -----------------------------------------------------------------------------------

EXTENSION_LABELS: Final = {
    "TotalLoginFailures": "client login failures:",
    "TotalServerConnectionsExpired": "server connections expired:",
    "TotalServerConnectionsDropped": "server connections dropped:",
    "TotalClientAbortsResynced": "client aborts resynced:",
    "TotalCapacityRefusals": "logins refused, cache full:",
    "BackendWaits": "waits for the server:",
}
assert tuple(EXTENSION_LABELS) == EXTENSION_FIELDS


_GAUGES: Final = (
    ("CurrentClientConnections", "PeakClientConnections"),
    ("InUseServerConnections", "PeakInUseServerConnections"),
    ("RetainedServerConnections", "PeakRetainedServerConnections"),
)


def counter_rows(source: Source, *, select_cache_enabled: bool, localtime: LocalTime) -> list[Row]:
    """The ``counters`` view: up-imapproxy's screen, row for row from its screen row 2."""
    snapshot = as_snapshot(source)
    return [
        *_time_rows(snapshot, localtime),
        *_gauge_rows(snapshot, "CLIENT CONNECTIONS", *_GAUGES[0]),
        *_gauge_rows(snapshot, "ACTIVE SERVER CONNECTIONS", *_GAUGES[1]),
        *_gauge_rows(snapshot, "CACHED SERVER CONNECTIONS", *_GAUGES[2]),
        *_total_rows(snapshot),
        *_select_cache_rows(snapshot, select_cache_enabled),
        *_extension_rows(snapshot),
    ]


def _time_rows(snapshot: Snapshot, localtime: LocalTime) -> list[Row]:
    return [
        Row("Server Start Time:", time_text(snapshot.get("StartTime", 0), localtime), "time"),
        Row("Last Counter Reset Time:", time_text(snapshot.get("CountTime", 0), localtime), "time"),
        BLANK,
    ]


def _gauge_rows(snapshot: Snapshot, title: str, current: str, peak: str) -> list[Row]:
    """A section of a gauge: its current value, and beside it the peak since the last reset."""
    values = ("current:", _number(snapshot, current))
    return [heading(title), BLANK, Row(*values, beside=("peak:", _number(snapshot, peak))), BLANK]


def _total_rows(snapshot: Snapshot) -> list[Row]:
    logins = snapshot.get("TotalClientLogins", 0)
    created = snapshot.get("TotalServerConnectionsCreated", 0)
    return [
        heading("CONNECTION TOTALS"),
        BLANK,
        Row("client connections accepted:", _number(snapshot, "TotalClientConnectionsAccepted")),
        Row("client logins:", number_text(logins)),
        Row("server connections created:", number_text(created)),
        Row("server connection reuses:", _number(snapshot, "TotalServerConnectionsReused")),
        Row("client login to server login ratio:", ratio_text(logins, created)),
        BLANK,
    ]


def _select_cache_rows(snapshot: Snapshot, enabled: bool) -> list[Row]:
    """SELECT cache hits and misses, or up-imapproxy's notice if ``enable_select_cache`` is off."""
    if not enabled:
        return [heading("SELECT CACHE NOT ENABLED")]
    hits = ("hit:", _number(snapshot, "SelectCacheHits"))
    return [
        heading("SELECT CACHE TOTALS"),
        BLANK,
        Row(*hits, beside=("miss:", _number(snapshot, "SelectCacheMisses"))),
    ]


def _extension_rows(snapshot: Snapshot) -> list[Row]:
    """Our extension counters, only when the file has them (a file of up-imapproxy's has not)."""
    if not has_extension(snapshot):
        return []
    fields = [Row(label, _number(snapshot, name)) for name, label in EXTENSION_LABELS.items()]
    return [BLANK, heading("IMAPPROXY TOTALS"), BLANK, *fields]


def _number(snapshot: Snapshot, name: str) -> str:
    return number_text(snapshot.get(name, 0))


# -- rates --------------------------------------------------------------------------------------

RATE_LABELS: Final = {
    "TotalClientConnectionsAccepted": "client connections accepted:",
    "TotalClientLogins": "client logins:",
    "TotalServerConnectionsCreated": "server connections created:",
    "TotalServerConnectionsReused": "server connection reuses:",
    "TotalSelectCommands": "SELECT commands:",
    "SelectCacheHits": "SELECT cache hits:",
    "SelectCacheMisses": "SELECT cache misses:",
}


def rate(current: Snapshot, previous: Snapshot | None, name: str, elapsed_s: float) -> float | None:
    """Counter ``name``'s increase per second between two snapshots ``elapsed_s`` apart.

    None (shown ``N/A``) when there is no earlier snapshot, the interval is not positive, the
    proxy restarted or the counters were reset in between (``StartTime`` or ``CountTime``
    changed), or the counter went down.
    """
    if previous is None or elapsed_s <= 0 or _restarted(current, previous):
        return None
    delta = current.get(name, 0) - previous.get(name, 0)
    return None if delta < 0 else delta / elapsed_s


def _restarted(current: Snapshot, previous: Snapshot) -> bool:
    return any(current.get(name) != previous.get(name) for name in ("StartTime", "CountTime"))


def rate_rows(
    current: Source, previous: Source | None, elapsed_s: float, *, select_cache_enabled: bool
) -> list[Row]:
    """The ``rates`` view: rates per second over the last interval, then the hit ratios.

    The extension's counters get rates too when the file has them.
    """
    now = as_snapshot(current)
    before = None if previous is None else as_snapshot(previous)
    labels = dict(RATE_LABELS)
    if has_extension(now):
        labels.update(EXTENSION_LABELS)
    fields = [
        Row(label, rate_text(rate(now, before, name, elapsed_s))) for name, label in labels.items()
    ]
    return [
        Row("interval:", _interval_text(before, elapsed_s), "info"),
        BLANK,
        heading("RATES PER SECOND (LAST INTERVAL)"),
        BLANK,
        *fields,
        BLANK,
        *_ratio_rows(now, select_cache_enabled),
    ]


def _interval_text(previous: Snapshot | None, elapsed_s: float) -> str:
    if previous is None:
        return "waiting for a second reading"
    return f"{elapsed_s:.2f} s"


def _ratio_rows(snapshot: Snapshot, select_cache_enabled: bool) -> list[Row]:
    """Connection cache hits = reuses / logins; SELECT cache hits = hits / (hits + misses)."""
    reused = snapshot.get("TotalServerConnectionsReused", 0)
    logins = snapshot.get("TotalClientLogins", 0)
    hits, misses = snapshot.get("SelectCacheHits", 0), snapshot.get("SelectCacheMisses", 0)
    select = percent_text(hits, hits + misses) if select_cache_enabled else "not enabled"
    return [
        heading("HIT RATIOS (SINCE THE LAST RESET)"),
        BLANK,
        Row("connection cache (reuses / logins):", percent_text(reused, logins)),
        Row("SELECT cache (hits / SELECTs looked up):", select),
    ]


# -- about, waiting, help -------------------------------------------------------------------------


def file_format_text(snapshot: Snapshot | None) -> str:
    if snapshot is None:
        return "not readable yet"
    if snapshot.get("WorkerCount"):
        return "imapproxy (up-imapproxy's 72 bytes + extension + worker table)"
    if has_extension(snapshot):
        return "imapproxy (up-imapproxy's 72 bytes + extension)"
    return "up-imapproxy 1.2.8 (72 bytes, no extension)"


def workers_text(snapshot: Snapshot | None) -> str:
    """How many processes count into the file (``Counters.summed()``'s ``WorkerCount``)."""
    if snapshot is None:
        return "not readable yet"
    count = snapshot.get("WorkerCount", 0)
    if not count:
        return "1 (one process)"
    return f"{count} (a supervisor and {count} worker processes)"


def about_rows(
    *,
    version: str,
    config_path: str,
    stat_filename: str,
    select_cache_enabled: bool,
    source: Source | None,
    backend_tls: tuple[int, int, str] | None = None,
) -> list[Row]:
    """The ``about`` view: what is shown, from which files, and the keys; and what the proxy
    knows of TLS with the IMAP server (``Counters.backend_tls``)."""
    snapshot = None if source is None else as_snapshot(source)
    return [
        heading("PIMPSTAT"),
        BLANK,
        Row("version:", f"imapproxy {version}", "info"),
        Row("configuration file:", config_path, "info"),
        Row("statistics file (read-only):", stat_filename, "info"),
        Row("file format:", file_format_text(snapshot), "info"),
        Row("workers:", workers_text(snapshot), "info"),
        Row("SELECT cache:", "enabled" if select_cache_enabled else "not enabled", "info"),
        Row("TLS with the IMAP server:", backend_tls_text(backend_tls), "info"),
        Row("refresh:", "every second", "info"),
        BLANK,
        heading("KEYS"),
        BLANK,
        *(Row(key, meaning, "info") for key, meaning in KEYS),
        Row("Ctrl-C", "quit", "info"),
        BLANK,
        heading("VIEWS"),
        BLANK,
        *(Row(name, VIEW_TITLES[name], "info") for name in VIEWS),
    ]


def backend_tls_text(backend_tls: tuple[int, int, str] | None) -> str:
    if backend_tls is None:
        return "not readable yet"
    code, _, text = backend_tls  # the text says it all; a file before version 2 has none
    if text:
        return text
    return ("not tried", "working", "failing")[code] if 0 <= code < 3 else "unknown"


def server_rows(lines: Sequence[ServerLine] | None, path: str, localtime: LocalTime) -> list[Row]:
    """The ``servers`` view: every server address the proxy tried, up or down, since when."""
    rows = [heading("IMAP SERVERS"), BLANK]
    if lines is None:
        return [*rows, Row("file:", path, "info"), Row("problem:", "cannot read it", "info")]
    if not lines:
        return [*rows, Row("No server contacted yet.", kind="text")]
    for line in lines:
        state = "UP" if line.state is State.UP else "DOWN"
        rows.append(Row(f"{line.server} ({line.address}):", state, "info"))
        if line.changed_unix:
            rows.append(Row("  since:", time_text(line.changed_unix, localtime), "info"))
        if line.failures:
            rows.append(Row("  failures in a row:", str(line.failures), "info"))
        if line.last_error:
            rows.append(Row("  last error:", line.last_error, "info"))
    return rows


WORKER_COLUMNS: Final = (  # 77 columns: an 80-column screen inside its border
    ("worker", 6),
    ("pid", 7),  # Linux's pid_max is at most 2**22: 7 digits
    ("clients", 7),
    ("active", 7),
    ("cached", 7),
    ("logins", 10),  # an unsigned counter
    ("reused", 10),
    ("hits", 7),
    ("restarts", 8),
)


def worker_line(cells: Sequence[str]) -> str:
    """One line of the workers table, each cell right-aligned in its column."""
    return " ".join(
        f"{cell:>{width}}" for cell, (_, width) in zip(cells, WORKER_COLUMNS, strict=True)
    )


def _worker_cells(name: str, pid: str, snapshot: Snapshot, restarts: int) -> list[str]:
    logins = snapshot.get("TotalClientLogins", 0)
    reused = snapshot.get("TotalServerConnectionsReused", 0)
    gauges = ("CurrentClientConnections", "InUseServerConnections", "RetainedServerConnections")
    return [
        name,
        pid,
        *(str(snapshot.get(gauge, 0)) for gauge in gauges),
        str(logins),
        str(reused),
        percent_text(reused, logins),
        str(restarts),
    ]


def worker_rows(totals: Snapshot, workers: Sequence[Snapshot]) -> list[Row]:
    """The ``workers`` view: a line per worker process (``Counters.worker_snapshots()``), its
    pid (``-`` while its slot is empty), and the totals (``Counters.summed()``), which also
    count the workers that exited; hits are reuses / logins, as in the rates view."""
    rows = [heading("WORKER PROCESSES"), BLANK]
    if not workers:
        return [
            *rows,
            Row("One process: this statistics file has no worker table", kind="text"),
            Row("(workers 1, or a file of up-imapproxy's).", kind="text"),
        ]
    header = worker_line([name for name, _ in WORKER_COLUMNS])
    lines = [
        _worker_cells(str(index), str(w.get("WorkerPid", 0) or "-"), w, w.get("WorkerRestarts", 0))
        for index, w in enumerate(workers)
    ]
    total = _worker_cells("total", "", totals, totals.get("WorkerRestarts", 0))
    return [
        *rows,
        Row(header, kind="heading"),
        *(Row(worker_line(cells), kind="text") for cells in lines),
        Row(worker_line(total), kind="text"),
        BLANK,
        Row("workers restarted after dying:", number_text(totals.get("WorkerRestarts", 0))),
    ]


def waiting_rows(stat_filename: str, problem: str) -> list[Row]:
    """Shown while the statistics file is missing, unreadable or too short to be one."""
    return [
        heading("WAITING FOR THE STATISTICS FILE"),
        BLANK,
        Row("file:", stat_filename, "info"),
        Row("problem:", problem, "info"),
        BLANK,
        Row("Read again every second. Is imapproxyd running with this stat_filename?", kind="text"),
    ]


def help_line() -> str:
    """The keys, for the bottom line of the screen."""
    return "  ".join(f"{key} {meaning.split(':')[0]}" for key, meaning in KEYS)

"""Health records: which server addresses are up, and when to probe those that are down.

Sans-I/O: no sockets, no clock (callers pass ``now``, monotonic seconds). The caller connects,
logs and probes; this module decides, in the manner of Dovecot's login proxy, which fails fast
towards a backend that is down instead of making every user wait for a connect timeout.

* ``down_after`` consecutive failures of an address (connect refused or timed out, no greeting,
  a login dialogue that broke: not a rejected password) mark it DOWN.
* While DOWN, logins routed to it are refused at once (``usable`` is False); the caller's probe
  runs at ``next_probe_at``. A probe that fails doubles the back-off, up to ``max_backoff``;
  the first success (a probe or a login) marks it UP again.
* Every method that changes the state returns the ``Change`` (down or up) once, for the log.
"""

from __future__ import annotations

import enum
from collections.abc import Container, Hashable, Iterator
from dataclasses import dataclass

INITIAL_BACKOFF_S = 1.0  # the first probe of a server just marked down


class State(enum.Enum):
    UP = "up"
    DOWN = "down"


@dataclass
class Record:
    """One address of one server."""

    server: str  # "host:port", as the route names it
    address: str  # the address tried, for the log and the admin view
    state: State = State.UP
    failures: int = 0  # consecutive
    backoff_s: float = 0.0
    next_probe_at: float = 0.0
    changed_at: float = 0.0
    last_error: str = ""


@dataclass(frozen=True)
class Change:
    """A state change to log once."""

    record: Record
    state: State
    reason: str


class HealthBook:
    """The health records of every address the proxy has tried, keyed by address."""

    def __init__(self, down_after: int, max_backoff: float) -> None:
        self.down_after = down_after
        self.max_backoff = max_backoff
        self._records: dict[Hashable, Record] = {}

    def record(self, key: Hashable, server: str, address: str) -> Record:
        found = self._records.get(key)
        if found is None:
            found = self._records[key] = Record(server, address)
        return found

    def usable(self, key: Hashable) -> bool:
        found = self._records.get(key)
        return found is None or found.state is State.UP

    def failed(
        self, key: Hashable, server: str, address: str, reason: str, now: float
    ) -> Change | None:
        """A connect or login-protocol failure: DOWN after ``down_after`` in a row."""
        record = self.record(key, server, address)
        record.failures += 1
        record.last_error = reason
        if record.state is State.DOWN or record.failures < self.down_after:
            return None
        record.state, record.changed_at = State.DOWN, now
        record.backoff_s = min(INITIAL_BACKOFF_S, self.max_backoff)
        record.next_probe_at = now + record.backoff_s
        return Change(record, State.DOWN, reason)

    def succeeded(self, key: Hashable, now: float) -> Change | None:
        """The address answered (a probe's greeting, or a login): UP, failures forgotten."""
        record = self._records.get(key)
        if record is None:
            return None
        record.failures, record.backoff_s, record.last_error = 0, 0.0, ""
        if record.state is State.UP:
            return None
        record.state, record.changed_at = State.UP, now
        return Change(record, State.UP, "answered")

    def probe_failed(self, key: Hashable, reason: str, now: float) -> None:
        """Still down: try again after twice the back-off (capped)."""
        record = self._records.get(key)
        if record is None or record.state is State.UP:
            return
        record.last_error = reason
        record.backoff_s = min(record.backoff_s * 2, self.max_backoff)
        record.next_probe_at = now + record.backoff_s

    def due(self, now: float) -> list[Hashable]:
        """Addresses down whose probe time has come."""
        return [
            key
            for key, record in self._records.items()
            if record.state is State.DOWN and record.next_probe_at <= now
        ]

    def next_deadline(self, skip: Container[Hashable] = ()) -> float | None:
        """The earliest probe time of an address that is down (and not in ``skip``)."""
        times = [
            r.next_probe_at
            for key, r in self._records.items()
            if r.state is State.DOWN and key not in skip
        ]
        return min(times) if times else None

    def records(self) -> Iterator[Record]:
        """Every record, by server then address (the admin view)."""
        return iter(sorted(self._records.values(), key=lambda r: (r.server, r.address)))

    def reconfigure(self, down_after: int, max_backoff: float) -> None:
        self.down_after, self.max_backoff = down_after, max_backoff


# -- the servers file, for pimpstat ----------------------------------------------------------------
# Beside the statistics file, at ``servers_path(stat_filename)``: one line per address,
# tab-separated: server, address, up|down, failures in a row, the Unix time of the last state
# change (0: never changed), the last error. The proxy rewrites it in place (after dropping
# privileges it may not create files); a reader that catches a write half-done skips the lines
# that do not parse.

SERVERS_SUFFIX = ".servers"


@dataclass(frozen=True)
class ServerLine:
    server: str
    address: str
    state: State
    failures: int
    changed_unix: int
    last_error: str


def servers_path(stat_filename: str) -> str:
    return stat_filename + SERVERS_SUFFIX


def format_servers(records: Iterator[Record], wall_now: float, now: float) -> bytes:
    """The file's text; ``changed_at`` (monotonic) becomes Unix time with ``wall_now - now``."""
    lines = []
    for r in records:
        changed = int(wall_now - (now - r.changed_at)) if r.changed_at else 0
        fields = (r.server, r.address, r.state.value, str(r.failures), str(changed), r.last_error)
        lines.append("\t".join(_one_line(f) for f in fields) + "\n")
    return "".join(lines).encode("utf-8", "backslashreplace")


def _one_line(text: str) -> str:
    return "".join(" " if c in "\t\r\n" else c for c in text)


def parse_servers(text: str) -> list[ServerLine]:
    """The file's lines that parse (a half-written one does not)."""
    parsed = []
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) != 6 or fields[2] not in ("up", "down"):
            continue
        if not fields[3].isdigit() or not fields[4].isdigit():
            continue
        parsed.append(
            ServerLine(
                fields[0], fields[1], State(fields[2]), int(fields[3]), int(fields[4]), fields[5]
            )
        )
    return parsed

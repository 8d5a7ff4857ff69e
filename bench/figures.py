"""Figures: what one round measured, and the summary over a case's rounds.

A round is one target measured once (a window of a workload). Its latencies are reduced to
percentiles at once (nearest rank); a case's figure for a target is the median over its
rounds of each rate and percentile, while errors are summed, the reuse share is taken over all
logins of all rounds and CPU per unit is the CPU of all rounds over their units: a proxy's CPU
comes in 10 ms clock ticks, and a slow target (up-imapproxy with the plain client does 8 pages
a second) may spend less than a tick in a round. Below ``MIN_CPU_S`` in all, it is not shown.
Backend waits per unit (imapproxy only: its ``BackendWaits`` counter) are likewise all rounds'
waits over all their units, and so are imapproxy's cache hit ratio (its statistics file:
sessions reused over client logins) and the share of its logins handed to another worker (its
log) over all rounds' logins.
"""

from __future__ import annotations

import math
import os
import statistics
from collections import Counter
from dataclasses import dataclass, field

from bench.pages import Tally

MIB = 1 << 20
MIN_CPU_S = 0.05  # five clock ticks


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list (NaN when empty)."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Cost:
    """CPU seconds spent during a round, Dovecot logins seen in its log, and the times a
    client of imapproxy waited for Dovecot (``BackendWaits``; None for the other targets).

    ``machine_cpu_s`` is the whole machine's busy time; what the proxy, Dovecot and the load
    generator do not explain is other load (another program, the kernel's own work), noise
    that the report shows per round as a share of the machine.
    """

    proxy_cpu_s: float | None = None
    dovecot_cpu_s: float = 0.0
    loadgen_cpu_s: float = 0.0
    backend_logins: int = 0
    machine_cpu_s: float = 0.0
    wall_s: float = 0.0
    backend_waits: int | None = None
    proxy_system_s: float | None = None  # the kernel's part of ``proxy_cpu_s``
    proxy_logins: int | None = None  # imapproxy's TotalClientLogins (all workers)
    proxy_reused: int | None = None  # ... and TotalServerConnectionsReused
    handovers: int | None = None  # imapproxy's logins handed to another worker (its log)

    def other_share(self) -> float | None:
        if self.wall_s <= 0:
            return None
        ours = (self.proxy_cpu_s or 0.0) + self.dovecot_cpu_s + self.loadgen_cpu_s
        return max(0.0, self.machine_cpu_s - ours) / (self.wall_s * (os.cpu_count() or 1))


@dataclass
class Round:
    """One target measured once."""

    rate: float  # units per second (pages, NOOPs, FETCHes)
    units: int
    p50_s: float
    p90_s: float
    p99_s: float
    errors: Counter[str]
    logins: int
    reuses: int
    mib_per_s: float
    cost: Cost

    @classmethod
    def of(cls, tally: Tally, rate: float, cost: Cost) -> Round:
        ordered = sorted(tally.latencies_s)
        return cls(
            rate=rate,
            units=tally.units,
            p50_s=percentile(ordered, 0.50),
            p90_s=percentile(ordered, 0.90),
            p99_s=percentile(ordered, 0.99),
            errors=Counter(tally.errors),
            logins=tally.logins,
            reuses=tally.reuses,
            mib_per_s=tally.bytes / MIB / tally.busy_s if tally.busy_s > 0 else 0.0,
            cost=cost,
        )


@dataclass
class Summary:
    """A target's figures for a case, over its rounds."""

    rounds: int
    rate: float
    p50_s: float
    p90_s: float
    p99_s: float
    mib_per_s: float
    units: int
    errors: Counter[str] = field(default_factory=Counter)
    reuse_share: float | None = None
    backend_logins_per_unit: float | None = None
    backend_waits_per_unit: float | None = None
    proxy_cpu_s_per_unit: float | None = None
    dovecot_cpu_s_per_unit: float | None = None
    loadgen_cpu_s_per_unit: float | None = None
    other_load: float | None = None
    proxy_system_s_per_unit: float | None = None
    hit_ratio: float | None = None  # imapproxy: reused over client logins (statistics file)
    handover_share: float | None = None  # imapproxy: logins handed to another worker

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(present) if present else None


def summarize(rounds: list[Round]) -> Summary:
    def mid(values: list[float | None]) -> float:
        found = median(values)
        return math.nan if found is None else found

    errors: Counter[str] = Counter()
    for one in rounds:
        errors.update(one.errors)
    logins = sum(r.logins for r in rounds)
    units = sum(r.units for r in rounds)
    return Summary(
        rounds=len(rounds),
        rate=mid([r.rate for r in rounds]),
        p50_s=mid([r.p50_s for r in rounds]),
        p90_s=mid([r.p90_s for r in rounds]),
        p99_s=mid([r.p99_s for r in rounds]),
        mib_per_s=mid([r.mib_per_s for r in rounds]),
        units=units,
        errors=errors,
        reuse_share=sum(r.reuses for r in rounds) / logins if logins else None,
        backend_logins_per_unit=(sum(r.cost.backend_logins for r in rounds) / units)
        if units
        else None,
        backend_waits_per_unit=waits_per_unit([r.cost.backend_waits for r in rounds], units),
        proxy_cpu_s_per_unit=per_unit([r.cost.proxy_cpu_s for r in rounds], units),
        dovecot_cpu_s_per_unit=per_unit([r.cost.dovecot_cpu_s for r in rounds], units),
        loadgen_cpu_s_per_unit=per_unit([r.cost.loadgen_cpu_s for r in rounds], units),
        other_load=median([r.cost.other_share() for r in rounds]),
        proxy_system_s_per_unit=system_per_unit(rounds, units),
        hit_ratio=share_of([r.cost.proxy_reused for r in rounds], rounds),
        handover_share=share_of([r.cost.handovers for r in rounds], rounds),
    )


def system_per_unit(rounds: list[Round], units: int) -> float | None:
    """The proxy's system CPU per unit, where its whole CPU is shown (``per_unit``)."""
    system = [r.cost.proxy_system_s for r in rounds]
    if per_unit([r.cost.proxy_cpu_s for r in rounds], units) is None or None in system:
        return None
    return sum(s for s in system if s is not None) / units


def share_of(counts: list[int | None], rounds: list[Round]) -> float | None:
    """``counts`` over all rounds over imapproxy's logins in them; None when not counted."""
    logins = [r.cost.proxy_logins for r in rounds]
    if not rounds or None in counts or None in logins:
        return None
    total = sum(n for n in logins if n is not None)
    return sum(n for n in counts if n is not None) / total if total else None


def per_unit(cpu_s: list[float | None], units: int) -> float | None:
    """CPU seconds per unit over all rounds; None when unknown or below the resolution."""
    if units == 0 or any(c is None for c in cpu_s):
        return None
    total = sum(c for c in cpu_s if c is not None)
    return total / units if total >= MIN_CPU_S else None


def waits_per_unit(waits: list[int | None], units: int) -> float | None:
    """Backend waits per unit over all rounds; None when not counted (not imapproxy)."""
    if units == 0 or not waits or any(w is None for w in waits):
        return None
    return sum(w for w in waits if w is not None) / units


@dataclass
class MemoryPoint:
    """A proxy's resident memory with ``sessions`` backend sessions, cached or in use."""

    sessions: int
    state: str  # "cached" or "open"
    rss_kib: int
    dovecot_sessions: int  # connections to Dovecot above the baseline: the proxy holds them
    errors: int

    def kib_per_session(self, baseline_kib: int) -> float:
        return (self.rss_kib - baseline_kib) / self.sessions if self.sessions else math.nan


@dataclass
class MemoryFigures:
    """The memory workload for one proxy."""

    baseline_kib: int
    points: list[MemoryPoint] = field(default_factory=list)

    def per_session(self, state: str) -> tuple[int, float] | None:
        """(sessions, KiB per session) at the largest point of ``state``."""
        chosen = [p for p in self.points if p.state == state]
        if not chosen:
            return None
        point = max(chosen, key=lambda p: p.sessions)
        return point.sessions, point.kib_per_session(self.baseline_kib)

"""The project's performance goals, as data, and their verdict for one SELECT cache setting.

Each goal reads the summaries (``Summaries``: case -> target key -> ``Summary``) and says met,
missed or not measured, with the figures it compared. Target keys are ``dovecot``, ``limit``,
``floor`` (the floor relay), ``up-off``/``up-on`` and ``ipx-off``/``ipx-on``, and for the
server over TLS (SELECT cache on only) ``dovecot-tls``, ``up-tls`` and ``ipx-tls``, and for
imapproxy's options (SELECT cache on only, against ``ipx-on``) ``ipx-map``, ``ipx-sql`` and
``ipx-pp``, and for its worker processes (SELECT cache on only) ``ipx-w1`` and ``ipx-w2``;
``cache`` is ``off`` or ``on``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from bench.figures import MemoryFigures, Summary
from bench.workloads import Case

Summaries = dict[Case, dict[str, Summary]]

NOOP_BUDGET_US = 1.5 * 24  # the round trip imapproxy may add over direct Dovecot
CACHED_SESSION_KIB = 16
OPEN_CONNECTION_KIB = 32
TLS_OVER_DIRECT = 3.0  # issue 10: up-imapproxy's best case reaches 3.3x (c=1) and 3.0x (c=8)
BACKEND_WAITS = {"off": 2.0, "on": 1.0}  # per page: SELECT + FETCH, or the FETCH alone
ROUTED_SHARE = 0.95  # issue 11: a routed login within 5 % of pages/s unrouted
PROXY_METRICS_SHARE = 0.97  # issue 12: PROXY protocol and metrics cost under 3 % pages/s
# issue 13: with user affinity "the cache hit ratio with N workers equals that with one"; it
# sets no figure for pages/s or CPU (reported, not judged). One point of slack: a round's
# first pages may find a user's sessions both in use in either target.
WORKERS_HIT_RATIO_SLACK = 0.01


@dataclass(frozen=True)
class Verdict:
    met: bool | None  # None: not measured
    text: str

    @property
    def cell(self) -> str:
        word = {True: "**met**", False: "**missed**", None: "not measured"}[self.met]
        return f"{word}: {self.text}" if self.text else word


@dataclass(frozen=True)
class Evidence:
    """What a goal may read."""

    summaries: Summaries
    memory: dict[str, MemoryFigures]
    cache: str

    def get(self, case: Case, key: str) -> Summary | None:
        """The summary of ``key`` (``up``/``ipx`` take the cache setting) for ``case``."""
        if key in ("up", "ipx"):
            key = f"{key}-{self.cache}"
        return self.summaries.get(case, {}).get(key)


@dataclass(frozen=True)
class Goal:
    text: str
    judge: Callable[[Evidence], Verdict]


def number(value: float, digits: int = 0) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


def compare(ours: float, limit: float, text: str, *, at_least: bool) -> Verdict:
    if math.isnan(ours) or math.isnan(limit):
        return Verdict(None, "")
    met = ours >= limit if at_least else ours <= limit
    return Verdict(met, text)


def page(client: str, concurrency: int) -> Case:
    return Case("page", client, concurrency)


def throughput_vs_up(concurrency: int) -> Goal:
    def judge(evidence: Evidence) -> Verdict:
        up = evidence.get(page("quickack", concurrency), "up")
        ours = [evidence.get(page(c, concurrency), "ipx") for c in ("plain", "quickack")]
        if up is None or None in ours:
            return Verdict(None, "")
        worst = min(s.rate for s in ours if s is not None)
        return compare(
            worst, up.rate, f"{number(worst)} vs {number(up.rate)} pages/s", at_least=True
        )

    return Goal(
        f"pages/s at c={concurrency}, either client, >= up-imapproxy with the quickack client",
        judge,
    )


def no_errors(evidence: Evidence) -> Verdict:
    counts = [
        by_target.get(f"ipx-{evidence.cache}")
        for case, by_target in evidence.summaries.items()
        if case.workload == "page"
    ]
    present = [s for s in counts if s is not None]
    if not present:
        return Verdict(None, "")
    errors = sum(s.error_count for s in present)
    return Verdict(errors == 0, f"{errors} errors in {sum(s.units for s in present):,} pages")


def faster_than_direct(evidence: Evidence) -> Verdict:
    ratios = []
    for client in ("plain", "quickack"):
        ours, direct = (
            evidence.get(page(client, 1), "ipx"),
            evidence.get(page(client, 1), "dovecot"),
        )
        if ours is None or direct is None:
            return Verdict(None, "")
        ratios.append((ours.rate / direct.rate, client))
    worst, client = min(ratios)
    return compare(worst, 1.5, f"{worst:.2f}x direct ({client} client)", at_least=True)


def near_the_limit(client: str) -> Goal:
    def judge(evidence: Evidence) -> Verdict:
        ours, limit = evidence.get(page(client, 1), "ipx"), evidence.get(page(client, 1), "limit")
        if ours is None or limit is None:
            return Verdict(None, "")
        ratio = ours.p50_s / limit.p50_s
        text = f"{ours.p50_s * 1e3:.2f} vs {limit.p50_s * 1e3:.2f} ms, {ratio:.2f}x"
        return compare(ratio, 1.3, text, at_least=False)

    return Goal(f"page p50 at c=1 ({client} client) <= 1.3x the limit's", judge)


def bulk_rate(evidence: Evidence) -> Verdict:
    case = Case("bulk", size="10 MiB")
    ours, direct = evidence.get(case, "ipx"), evidence.get(case, "dovecot")
    if ours is None or direct is None:
        return Verdict(None, "")
    ratio = ours.mib_per_s / direct.mib_per_s
    text = f"{number(ours.mib_per_s)} vs {number(direct.mib_per_s)} MiB/s, {ratio:.2f}x"
    return compare(ratio, 0.9, text, at_least=True)


def noop_added(evidence: Evidence) -> Verdict:
    """Missed, it also says what the floor relay adds: the part any gevent relay pays."""
    ours, direct = evidence.get(Case("noop"), "ipx"), evidence.get(Case("noop"), "dovecot")
    if ours is None or direct is None:
        return Verdict(None, "")
    added = (ours.p50_s - direct.p50_s) * 1e6
    verdict = compare(added, NOOP_BUDGET_US, f"+{added:.0f} µs", at_least=False)
    floor = evidence.get(Case("noop"), "floor")
    if verdict.met is False and floor is not None:
        floor_added = (floor.p50_s - direct.p50_s) * 1e6
        text = f"{verdict.text} (a minimal gevent relay adds {floor_added:+.0f} µs on this machine)"
        return Verdict(False, text)
    return verdict


def memory_per(state: str, budget_kib: float) -> Callable[[Evidence], Verdict]:
    def judge(evidence: Evidence) -> Verdict:
        figures = evidence.memory.get("imapproxy")
        found = figures.per_session(state) if figures else None
        if found is None:
            return Verdict(None, "")
        sessions, kib = found
        return compare(kib, budget_kib, f"{kib:.1f} KiB at {sessions:,}", at_least=False)

    return judge


def cpu_per_page(evidence: Evidence) -> Verdict:
    ratios = []
    for case in evidence.summaries:
        if case.workload != "page":
            continue
        ours, up = evidence.get(case, "ipx"), evidence.get(case, "up")
        if ours and up and ours.proxy_cpu_s_per_unit and up.proxy_cpu_s_per_unit:
            ratios.append((ours.proxy_cpu_s_per_unit / up.proxy_cpu_s_per_unit, case))
    if not ratios:
        return Verdict(None, "")
    worst, case = max(ratios, key=lambda pair: pair[0])
    ours_ms = (evidence.get(case, "ipx") or _EMPTY).proxy_cpu_s_per_unit or math.nan
    up_ms = (evidence.get(case, "up") or _EMPTY).proxy_cpu_s_per_unit or math.nan
    text = f"worst {worst:.2f}x ({ours_ms * 1e3:.3f} vs {up_ms * 1e3:.3f} ms, {case.label})"
    return compare(worst, 1.0, text, at_least=False)


def tls_over_direct(concurrency: int) -> Goal:
    def judge(evidence: Evidence) -> Verdict:
        if evidence.cache == "off":
            return Verdict(None, "the server over TLS runs with the SELECT cache on")
        by_target = evidence.summaries.get(Case("tls", "quickack", concurrency), {})
        ours, direct = by_target.get("ipx-tls"), by_target.get("dovecot-tls")
        if ours is None or direct is None:
            return Verdict(None, "")
        ratio = ours.rate / direct.rate
        text = f"{number(ours.rate)} vs {number(direct.rate)} pages/s, {ratio:.2f}x"
        return compare(ratio, TLS_OVER_DIRECT, text, at_least=True)

    return Goal(
        f"server over TLS: pages/s at c={concurrency} >= {TLS_OVER_DIRECT:g}x direct Dovecot "
        "over TLS",
        judge,
    )


def option_share(keys: tuple[str, ...], least: float, what: str) -> Goal:
    """The worst of ``keys``' pages/s over ``ipx-on``'s in the options case, with no errors."""

    def judge(evidence: Evidence) -> Verdict:
        if evidence.cache == "off":
            return Verdict(None, "the options run with the SELECT cache on")
        case = next((c for c in evidence.summaries if c.workload == "options"), None)
        by_target = evidence.summaries.get(case, {}) if case else {}
        plain = by_target.get("ipx-on")
        found = [(by_target[k], k) for k in keys if k in by_target]
        if plain is None or len(found) < len(keys):
            return Verdict(None, "")
        worst, key = min(found, key=lambda pair: pair[0].rate)
        ratio = worst.rate / plain.rate
        errors = sum(s.error_count for s, _ in found)
        text = f"{key} {number(worst.rate)} vs {number(plain.rate)} pages/s, {ratio:.2f}x"
        text += f", {errors} errors" if errors else ""
        verdict = compare(ratio, least, text, at_least=True)
        return Verdict(verdict.met and not errors, text) if verdict.met is not None else verdict

    return Goal(f"{what}: pages/s at c=8 >= {least:g}x plain imapproxy's, no errors", judge)


def backend_waits(evidence: Evidence) -> Verdict:
    """The worst page case's waits per page through imapproxy, against the design's count."""
    found = []
    for case, by_target in evidence.summaries.items():
        ours = by_target.get(f"ipx-{evidence.cache}")
        if case.workload == "page" and ours and ours.backend_waits_per_unit is not None:
            found.append((ours.backend_waits_per_unit, case))
    if not found:
        return Verdict(None, "")
    worst, case = max(found, key=lambda pair: pair[0])
    text = f"worst {worst:.2f} ({case.label})"
    return compare(worst, BACKEND_WAITS[evidence.cache], text, at_least=False)


def workers_hit_ratio(evidence: Evidence) -> Verdict:
    """The worst case's hit ratio of ``workers 2`` against ``workers 1``'s, with no errors."""
    if evidence.cache == "off":
        return Verdict(None, "the workers run with the SELECT cache on")
    found = []
    for case, by_target in evidence.summaries.items():
        one, two = by_target.get("ipx-w1"), by_target.get("ipx-w2")
        if not (case.workload.startswith("workers") and one and two):
            continue
        if one.hit_ratio is not None and two.hit_ratio is not None:
            found.append((two.hit_ratio - one.hit_ratio, case, one, two))
    if not found:
        return Verdict(None, "")
    gap, case, one, two = min(found, key=lambda row: row[0])
    errors = sum(s.error_count for _, _, a, b in found for s in (a, b))
    text = f"worst {two.hit_ratio:.1%} vs {one.hit_ratio:.1%} ({case.label})"
    text += f", {errors} errors" if errors else ""
    return Verdict(gap >= -WORKERS_HIT_RATIO_SLACK and not errors, text)


_EMPTY = Summary(0, math.nan, math.nan, math.nan, math.nan, math.nan, 0)

GOALS = (
    throughput_vs_up(1),
    throughput_vs_up(8),
    throughput_vs_up(32),
    Goal("zero errors in every page run through imapproxy", no_errors),
    Goal("pages/s at c=1, either client, >= 1.5x direct Dovecot", faster_than_direct),
    near_the_limit("plain"),
    near_the_limit("quickack"),
    Goal("bulk 10 MiB FETCH >= 0.9x direct Dovecot's MiB/s", bulk_rate),
    Goal(f"NOOP p50 added over direct <= {NOOP_BUDGET_US:.0f} µs (1.5 x 24 µs)", noop_added),
    Goal(
        f"memory <= {CACHED_SESSION_KIB} KiB per cached session (largest point)",
        memory_per("cached", CACHED_SESSION_KIB),
    ),
    Goal(
        f"memory <= {OPEN_CONNECTION_KIB} KiB per open client connection (largest point)",
        memory_per("open", OPEN_CONNECTION_KIB),
    ),
    Goal("proxy CPU per page <= up-imapproxy's, every page case", cpu_per_page),
    Goal(
        "backend waits per page <= 2 with the SELECT cache off, <= 1 with it on, every page case",
        backend_waits,
    ),
    tls_over_direct(1),
    tls_over_direct(8),
    option_share(("ipx-map", "ipx-sql"), ROUTED_SHARE, "routed (route map, SQLite)"),
    option_share(("ipx-pp",), PROXY_METRICS_SHARE, "PROXY protocol v2 and metrics on"),
    Goal(
        "workers 2: cache hit ratio >= workers 1's (less one point), every workers case, no errors",
        workers_hit_ratio,
    ),
)


def verdicts(summaries: Summaries, memory: dict[str, MemoryFigures]) -> list[list[str]]:
    """Rows of goal, verdict with SELECT cache off, verdict with it on."""
    rows = []
    for goal in GOALS:
        cells = [goal.judge(Evidence(summaries, memory, cache)).cell for cache in ("off", "on")]
        rows.append([goal.text, *cells])
    return rows

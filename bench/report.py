"""The report: Markdown tables of the figures, the goals' verdicts, the machine and the method.

``render`` builds the whole results file; ``summary`` the part that goes into BENCHMARKS.md
(between the ``SUMMARY_START``/``SUMMARY_END`` markers, with ``--publish``). Ratios are always
imapproxy's figure divided by the other target's, whichever way is better for that row.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.figures import MemoryFigures, Summary, summarize
from bench.goals import Summaries, verdicts
from bench.plan import Plan
from bench.workloads import Case, Results

SUMMARY_START = "<!-- bench:summary:start -->"
SUMMARY_END = "<!-- bench:summary:end -->"
COLUMNS = ("dovecot", "limit", "floor", "up", "ipx")
PRODUCT_NAMES = {
    "dovecot": "Dovecot",
    "limit": "limit",
    "floor": "floor relay",
    "up": "up-imapproxy",
    "ipx": "imapproxy",
}
DASH = "—"
NOISY_SHARE = 0.10  # other load above which a figure is called noisy


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None or math.isnan(value):
        return DASH
    return f"{value:,.{digits}f}"


def summaries_of(results: Results) -> Summaries:
    return {
        case: {key: summarize(rounds) for key, rounds in by_target.items()}
        for case, by_target in results.rounds.items()
    }


# -- the summary table --------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """A row of the summary: a figure of a case, higher or lower being better.

    ``over_direct``: the figure minus direct Dovecot's (what a relay adds); Dovecot shows none.
    """

    label: str
    case: Case | None
    better: str  # "higher" or "lower"
    digits: int
    value: Callable[[Summary], float | None]
    over_direct: bool = False


def page_rows(concurrencies: Sequence[int]) -> list[Row]:
    rows = []
    for client in ("plain", "quickack"):
        for c in concurrencies:
            case = Case("page", client, c)
            rows.append(Row(f"page {client} c={c}: pages/s", case, "higher", 0, rate))
        case = Case("page", client, concurrencies[0])
        rows.append(Row(f"page {client} c={concurrencies[0]}: p50 ms", case, "lower", 2, p50_ms))
    case = Case("page", "quickack", concurrencies[len(concurrencies) // 2])
    label = f"page quickack c={case.concurrency}: proxy CPU ms/page"
    rows.append(Row(label, case, "lower", 3, proxy_ms))
    return rows


def rate(summary: Summary) -> float:
    return summary.rate


def p50_ms(summary: Summary) -> float:
    return summary.p50_s * 1e3


def proxy_ms(summary: Summary) -> float | None:
    cpu = summary.proxy_cpu_s_per_unit
    return None if cpu is None else cpu * 1e3


OTHER_ROWS = [
    Row("bulk 10 MiB: MiB/s", Case("bulk", size="10 MiB"), "higher", 0, lambda s: s.mib_per_s),
    Row("bulk 1 MiB: MiB/s", Case("bulk", size="1 MiB"), "higher", 0, lambda s: s.mib_per_s),
    Row("NOOP p50 µs", Case("noop"), "lower", 0, lambda s: s.p50_s * 1e6),
    Row("NOOP p50 added over direct µs", Case("noop"), "lower", 0, lambda s: s.p50_s * 1e6, True),
    Row("NOOP p99 µs", Case("noop"), "lower", 0, lambda s: s.p99_s * 1e6),
]


def ratio(ours: float | None, other: float | None) -> str:
    if ours is None or other is None or math.isnan(ours) or math.isnan(other) or other == 0:
        return DASH
    return f"{ours / other:.2f}x"


def summary_table(summaries: Summaries, memory: dict[str, MemoryFigures], cache: str) -> str:
    keys = {"dovecot": "dovecot", "limit": "limit", "floor": "floor"}
    keys.update(up=f"up-{cache}", ipx=f"ipx-{cache}")
    concurrencies = sorted({c.concurrency for c in summaries if c.workload == "page"}) or [1]
    rows = figure_rows(summaries, page_rows(concurrencies) + OTHER_ROWS, keys, COMPARED)
    rows += memory_rows(memory)
    header = ["figure", *(PRODUCT_NAMES[c] for c in COLUMNS)]
    header += ["÷ up-imapproxy", "÷ Dovecot", "÷ limit", "better"]
    return table(header, rows)


COMPARED = ("up", "dovecot", "limit")  # imapproxy's figure is divided by these columns'


def figure_rows(
    summaries: Summaries, rows: Sequence[Row], keys: dict[str, str], compared: Sequence[str]
) -> list[list[str]]:
    """One line per row: the figure of each column (``keys``: column -> target key), then
    imapproxy's ratio to each ``compared`` column, then which way is better."""
    lines = []
    for row in rows:
        assert row.case is not None
        by_target = summaries.get(row.case, {})
        values = {
            col: (row.value(by_target[key]) if key in by_target else None)
            for col, key in keys.items()
        }
        if row.over_direct:
            values = over_direct(values)
        lines.append(
            [row.label]
            + [fmt(values[col], row.digits) for col in keys]
            + [ratio(values["ipx"], values[col]) for col in compared]
            + [row.better]
        )
    return lines


# -- the server over TLS ------------------------------------------------------------------------

TLS_KEYS = {"dovecot": "dovecot-tls", "up": "up-tls", "ipx": "ipx-tls"}


def tls_rows(concurrencies: Sequence[int]) -> list[Row]:
    rows = []
    for c in concurrencies:
        case = Case("tls", "quickack", c)
        rows.append(Row(f"TLS page quickack c={c}: pages/s", case, "higher", 0, rate))
        rows.append(Row(f"TLS page quickack c={c}: p50 ms", case, "lower", 2, p50_ms))
    case = Case("tls", "quickack", concurrencies[-1])
    label = f"TLS page quickack c={case.concurrency}: proxy CPU ms/page"
    rows.append(Row(label, case, "lower", 3, proxy_ms))
    return rows


def tls_table(summaries: Summaries) -> str:
    concurrencies = sorted({c.concurrency for c in summaries if c.workload == "tls"})
    if not concurrencies:
        return "Not measured.\n"
    rows = figure_rows(summaries, tls_rows(concurrencies), TLS_KEYS, ("up", "dovecot"))
    header = ["figure", "Dovecot over TLS", "up-imapproxy (STARTTLS)", "imapproxy (implicit TLS)"]
    return table(header + ["÷ up-imapproxy", "÷ Dovecot over TLS", "better"], rows)


TLS_TEXT = (
    "Dovecot direct over implicit TLS (its 993-style listener; the client does a full TLS "
    "handshake per page) against up-imapproxy with STARTTLS to Dovecot (`force_tls yes`) and "
    "imapproxy with implicit TLS to it (`server_tls yes`), both verifying Dovecot's certificate "
    "(`tls_ca_file`, `tls_verify_server yes`), both with the SELECT cache on; the clients speak "
    "cleartext to the proxies (they sit on the webmail host). Quickack client."
)


# -- imapproxy's options -----------------------------------------------------------------------

OPTION_NAMES = {
    "ipx-on": "imapproxy, plain (the reference)",
    "ipx-map": "imapproxy, routed by `route_map`",
    "ipx-sql": "imapproxy, routed by SQLite",
    "ipx-pp": "imapproxy, PROXY v2 header + `metrics_listen`",
    "ipx-proxy": "imapproxy, PROXY v2 header only",
    "ipx-metrics": "imapproxy, `metrics_listen` only",
}


def options_table(summaries: Summaries) -> str:
    """One row per target of the options case: pages/s and its ratio to the plain target."""
    case = next((c for c in summaries if c.workload == "options"), None)
    if case is None:
        return "Not measured.\n"
    by_target = summaries[case]
    plain = by_target.get("ipx-on")
    rows = []
    for key, name in OPTION_NAMES.items():
        s = by_target.get(key)
        if s is None:
            continue
        rows.append(
            [name, fmt(s.rate), ratio(s.rate, plain.rate if plain else None)]
            + [fmt(s.p50_s * 1e3, 2), cpu_ms(s.proxy_cpu_s_per_unit), errors_text(s)]
        )
    header = [f"target ({case.label})", "pages/s", "÷ plain", "p50 ms", "proxy CPU ms/page"]
    return table(header + ["errors"], rows)


OPTIONS_TEXT = (
    "imapproxy with the SELECT cache on, alone (the reference) and with each option of issues 11 "
    "and 12: every bench user routed to the same Dovecot by its full login name, from a "
    "`route_map` file and from a SQLite table (`route_sql_url`, `route_cache_ttl` at its "
    "default, 60 s), with no default server; and `proxy_protocol_trusted_networks 127.0.0.1` "
    "with `metrics_listen` on, each client connection starting with a PROXY v2 header (client "
    "192.0.2.10, the real ports), and each of those two alone. Quickack client; every target "
    "is measured once per round, each round starting one target later. The case takes less "
    "than the 60 s `route_cache_ttl`, so SQLite's answers come mostly from the proxy's route "
    "cache, as with steady traffic."
)


# -- workers ------------------------------------------------------------------------------------

WORKER_NAMES = {
    "up-on": "up-imapproxy, SELECT cache on",
    "ipx-w1": "imapproxy, `workers 1`",
    "ipx-w2": "imapproxy, `workers 2`",
}


def workers_table(summaries: Summaries) -> str:
    """Per case of the workers workloads, a row per target (up-imapproxy's from the page
    workload's quickack case at that concurrency when the workers case did not measure it)."""
    cases = [c for c in summaries if c.workload in ("workers", "workers-pinned")]
    if not cases:
        return "Not measured.\n"
    rows = []
    for case in cases:
        by_target = dict(summaries[case])
        name = dict(WORKER_NAMES)
        page_case = summaries.get(Case("page", "quickack", case.concurrency), {})
        if "up-on" not in by_target and "up-on" in page_case:
            by_target["up-on"] = page_case["up-on"]
            name["up-on"] += " (the page workload's figure)"
        one, up = by_target.get("ipx-w1"), by_target.get("up-on")
        pinned = "yes" if case.workload == "workers-pinned" else "no"
        for key in WORKER_NAMES:
            if key in by_target:
                rows.append(
                    [f"c={case.concurrency}", pinned, name[key]]
                    + worker_cells(by_target[key], one, up)
                )
    header = ["c", "pinned", "target", "pages/s", "÷ workers 1", "÷ up-imapproxy", "p50 ms"]
    header += ["proxy CPU ms/page", "user", "system", "cache hit ratio", "reuse seen by client"]
    return table(header + ["logins handed to the other worker", "errors"], rows)


def worker_cells(s: Summary, one: Summary | None, up: Summary | None) -> list[str]:
    system = s.proxy_system_s_per_unit
    total = s.proxy_cpu_s_per_unit
    user = None if total is None or system is None else total - system
    return [
        fmt(s.rate),
        ratio(s.rate, one.rate if one else None),
        ratio(s.rate, up.rate if up else None),
        fmt(s.p50_s * 1e3, 2),
        cpu_ms(total),
        cpu_ms(user),
        cpu_ms(system),
        share(s.hit_ratio, 1),
        share(s.reuse_share, 1),
        share(s.handover_share, 1),
        errors_text(s),
    ]


WORKERS_TEXT = (
    "imapproxy with `workers 1` (one process) and `workers 2` (a supervisor and two worker "
    "processes on one listener; a user's sessions live in worker blake2b(user) mod 2, and a "
    "login accepted by the other worker is handed to the owner with its socket, `SCM_RIGHTS`), "
    "both with the SELECT cache on, against up-imapproxy with the SELECT cache on. Quickack "
    "client, page windows; each target is first given two cached sessions per user and an "
    "unmeasured window, and each round starts one target later. *proxy CPU*: user + system of "
    "the whole process tree (supervisor, workers, file readers) from `/proc`. *cache hit "
    "ratio*: `TotalServerConnectionsReused` over `TotalClientLogins` of the statistics file, "
    "summed over the workers; *reuse seen by client*: logins answered `[XPROXYREUSE]`; *handed "
    "to the other worker*: the proxy's `handed to worker N` log lines over its logins. "
    "*pinned*: the proxies on one CPU, Dovecot and the load generator on the other."
)


# -- backend waits ------------------------------------------------------------------------------


def waits_table(summaries: Summaries) -> str:
    """imapproxy's backend waits per page (its ``BackendWaits``), per page case."""
    rows = []
    for case, by_target in summaries.items():
        if case.workload not in ("page", "tls"):
            continue
        keys = ("ipx-off", "ipx-on") if case.workload == "page" else ("", "ipx-tls")
        cells = [by_target[k].backend_waits_per_unit if k in by_target else None for k in keys]
        rows.append([case.label, *(fmt(cell, 2) for cell in cells)])
    return table(["case", "imapproxy, SELECT cache off", "imapproxy, SELECT cache on"], rows)


WAITS_TEXT = (
    "Times a client of imapproxy waited for Dovecot, per page, from the proxy's `BackendWaits` "
    "counter (each forwarded command's round trip, each SELECT-cache validation asked at SELECT "
    "time, and each reuse check whose reply had not arrived by the client's next command). "
    "The other targets wait by design: the limit 2 (SELECT + FETCH); up-imapproxy with the "
    "SELECT cache on 1 (the FETCH only: its cached SELECT is answered unchecked); direct "
    "Dovecot 4 (LOGIN + SELECT + FETCH + LOGOUT)."
)

NO_DELAY_TEXT = (
    "All figures are on loopback and carry no network delay: this machine's kernel has no "
    "`netem` (`CONFIG_NET_SCH_NETEM` is not set), so no round-trip time was added. Over a real "
    "network each backend wait costs a round trip more, which widens the lead of the targets "
    "that wait less."
)


def over_direct(values: dict[str, float | None]) -> dict[str, float | None]:
    """Each column's value minus Dovecot's; None for Dovecot itself and where unknown."""
    direct = values["dovecot"]
    return {
        col: None if col == "dovecot" or value is None or direct is None else value - direct
        for col, value in values.items()
    }


def memory_rows(memory: dict[str, MemoryFigures]) -> list[list[str]]:
    rows = []
    for state, label in (("cached", "KiB per cached session"), ("open", "KiB per open client")):
        found = {p: f.per_session(state) for p, f in memory.items()}
        up, ours = found.get("up-imapproxy"), found.get("imapproxy")
        sessions = (ours or up or (0, 0.0))[0]
        values = [DASH, DASH, DASH, fmt(up[1], 1) if up else DASH]
        values.append(fmt(ours[1], 1) if ours else DASH)
        compared = ratio(ours[1] if ours else None, up[1] if up else None)
        rows.append([f"memory: {label} at {sessions:,}", *values, compared, DASH, DASH, "lower"])
    return rows


# -- details ------------------------------------------------------------------------------------


def errors_text(summary: Summary) -> str:
    if not summary.errors:
        return "0"
    kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(summary.errors.items()))
    return f"{summary.error_count} ({kinds})"


def share(value: float | None, digits: int = 0) -> str:
    return DASH if value is None else f"{value * 100:.{digits}f} %"


def cpu_ms(value: float | None) -> str:
    return DASH if value is None else f"{value * 1e3:.3f}"


def details(summaries: Summaries) -> str:
    parts = []
    header = ["target", "rate/s", "p50 ms", "p90 ms", "p99 ms", "MiB/s", "errors", "reuse"]
    header += ["Dovecot logins/unit", "backend waits/unit", "CPU ms/unit: proxy", "of it system"]
    header += ["Dovecot", "load generator", "other load", "proxy's hit ratio", "handed over"]
    for case, by_target in summaries.items():
        rows = []
        for key, s in by_target.items():
            rows.append(
                [key, fmt(s.rate, 1), fmt(s.p50_s * 1e3, 3), fmt(s.p90_s * 1e3, 3)]
                + [fmt(s.p99_s * 1e3, 3), fmt(s.mib_per_s, 0) if case.workload == "bulk" else DASH]
                + [errors_text(s), share(s.reuse_share) if key != "limit" else DASH]
                + [fmt(s.backend_logins_per_unit, 2), fmt(s.backend_waits_per_unit, 2)]
                + [cpu_ms(s.proxy_cpu_s_per_unit), cpu_ms(s.proxy_system_s_per_unit)]
                + [cpu_ms(s.dovecot_cpu_s_per_unit), cpu_ms(s.loadgen_cpu_s_per_unit)]
                + [share(s.other_load), share(s.hit_ratio, 1), share(s.handover_share, 1)]
            )
        units = sum(s.units for s in by_target.values())
        parts.append(f"#### {case.label} ({units:,} units)\n\n" + table(header, rows))
    return "\n".join(parts)


def memory_details(memory: dict[str, MemoryFigures]) -> str:
    rows = []
    for product, figures in memory.items():
        rows.append([product, "0", "—", fmt(figures.baseline_kib), DASH, "0", "0"])
        for point in figures.points:
            rows.append(
                [product, f"{point.sessions:,}", point.state, fmt(point.rss_kib)]
                + [fmt(point.kib_per_session(figures.baseline_kib), 1)]
                + [f"{point.dovecot_sessions:,}", str(point.errors)]
            )
    header = ["proxy", "sessions", "state", "RSS KiB", "KiB per session"]
    header += ["Dovecot connections added", "errors"]
    return table(header, rows)


# -- the documents ------------------------------------------------------------------------------


def command_output(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "?"
    return done.stdout.strip() or "?"


def machine() -> list[list[str]]:
    cpu = "?"
    with open("/proc/cpuinfo", encoding="utf-8") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    debian = Path("/etc/debian_version")
    return [
        ["CPU", f"{cpu}, {os.cpu_count()} cores"],
        ["memory", f"{memory_gib:.0f} GiB"],
        ["kernel", platform.release()],
        ["OS", f"Debian {debian.read_text().strip()}" if debian.exists() else platform.platform()],
        ["Python", platform.python_version()],
        ["Dovecot", command_output(["dovecot", "--version"])],
        ["up-imapproxy", command_output(["dpkg-query", "-W", "-f=${Version}", "imapproxy"])],
        ["imapproxy", f"{command_output(['git', 'describe', '--always', '--dirty'])}{_scanner()}"],
    ]


def _scanner() -> str:
    """Which response scanner loop the proxies of this tree run (``protocol/_scan.c``)."""
    from imapproxy.protocol import scanner

    return " (response scanner in C)" if scanner.NATIVE else " (response scanner in Python)"


def summary(results: Results, plan: Plan, date: str, elapsed_s: float, command: str) -> str:
    summaries = summaries_of(results)
    machine_text = "; ".join(f"{name} {value}" for name, value in machine())
    parts = [
        f"Run of {date}: `{command}` (plan {plan.name}), {elapsed_s / 60:.1f} minutes. "
        f"Machine: {machine_text}.\n",
        "Ratios are imapproxy ÷ the other target; *better* says which way is good.\n",
        "#### SELECT cache off (both proxies)\n",
        summary_table(summaries, results.memory, "off"),
        "#### SELECT cache on (both proxies)\n",
        summary_table(summaries, results.memory, "on"),
        "#### Server over TLS (SELECT cache on in both proxies)\n",
        TLS_TEXT + "\n",
        tls_table(summaries),
        "#### Routing, PROXY protocol and metrics (SELECT cache on)\n",
        OPTIONS_TEXT + "\n",
        options_table(summaries),
        "#### Workers (issue 13; SELECT cache on)\n",
        WORKERS_TEXT + "\n",
        workers_table(summaries),
        "#### Backend waits per page\n",
        WAITS_TEXT + "\n",
        waits_table(summaries),
        "#### Goals\n",
        table(
            ["goal", "SELECT cache off", "SELECT cache on"],
            verdicts(summaries, results.memory),
        ),
    ]
    notes = results.notes + [NO_DELAY_TEXT] + noise_notes(summaries)
    if notes:
        parts.append("Notes:\n\n" + "".join(f"- {note}\n" for note in notes))
    return "\n".join(parts)


def noise_notes(summaries: Summaries) -> list[str]:
    """A warning when other programs used a noticeable share of the machine during rounds."""
    loads = [s.other_load for by in summaries.values() for s in by.values()]
    known = [load for load in loads if load is not None]
    noisy = [load for load in known if load > NOISY_SHARE]
    if not noisy:
        return []
    return [
        f"The machine was not quiet: in {len(noisy)} of {len(known)} figures (a target in a "
        f"case), more than {NOISY_SHARE * 100:.0f} % of its CPU (up to {max(noisy) * 100:.0f} %) "
        "went to neither the servers nor the load generator but to another program. Those "
        "figures are lower, and their latencies shifted (a busy CPU wakes faster); see *other "
        "load* in the report's details."
    ]


METHOD = """\
- Targets: direct Dovecot; *limit*, the same SELECT + FETCH on sessions kept logged in to
  Dovecot (what a perfect cache could reach); up-imapproxy (`/usr/sbin/imapproxyd`) and
  imapproxy (`python -m imapproxy`), each in front of the same Dovecot, each with the SELECT
  cache off and on, with the same `cache_size` 3072, `cache_expiration_time` 300 and
  `syslog_prioritymask LOG_INFO`; in the bulk and NOOP workloads only, the *floor relay*
  (`python -m bench.floor_relay`), the least a gevent relay can do: per client, `TCP_NODELAY`
  on both sockets, then `recv` from the client, `send` to Dovecot, `recv_into` one buffer and
  `send` it back until a read ends with the tagged line, nothing parsed. What it adds over
  direct Dovecot is what any gevent relay pays on this machine. Each round measures every
  target once, in the order Dovecot, limit, floor relay, up-imapproxy off, imapproxy off,
  up-imapproxy on, imapproxy on; figures are medians over the rounds (errors are summed),
  after one unmeasured warm-up window per target.
- Load generator: separate processes (two, threads inside), raw IMAP over blocking sockets,
  literal-aware reading. *plain* client: no `TCP_NODELAY`, no `TCP_QUICKACK` (as PHP leaves
  it); *quickack*: `TCP_QUICKACK` set after every `recv`. A page is connect, `LOGIN`,
  `SELECT INBOX`, `UID FETCH 1:50 (UID FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS (FROM
  SUBJECT DATE)])`, `LOGOUT`, close, for a user drawn from 200 (50 messages each); its
  latency is taken with `time.perf_counter`. Every FETCH must return 50 messages and exactly
  the header bytes the user's own mailbox gives direct, otherwise it is an error (`wrong
  data`), as is any non-OK reply, a time-out (5 s per I/O) or a refused connection. *reuse*
  is the share of `LOGIN`s answered with `* OK [XPROXYREUSE]`; *Dovecot logins/unit* counts
  the logins in Dovecot's log.
- CPU: a proxy's `utime + stime` from `/proc/<pid>/stat` (all its threads, 10 ms ticks, so
  summed over the rounds and not shown below 50 ms in all), of its process and of every live
  descendant (imapproxy's workers and privileged file readers), plus the `cutime + cstime` of
  its process (children it reaped); Dovecot's from
  `/proc/<pid>/schedstat` (ns) of its master and every live child plus the master's
  `cutime + cstime` (children already reaped); the load generator's from its processes' stat.
  Each round's CPU includes its untimed set-up (a bulk or NOOP session's LOGIN).
- Memory: fresh proxy instances (`cache_size` as large as the descriptor limit allows for
  up-imapproxy, which takes `2 * cache_size + 10` descriptors), RSS (`VmRSS`) with no session,
  after LOGIN + LOGOUT of 1,000 then 10,000 distinct users (each leaves a cached session), and
  with all of them logged in at once (open client connections). KiB per session is the RSS
  above the empty proxy divided by the sessions; the established connections to Dovecot's port
  (`/proc/net/tcp`) check that the proxy really holds them.
- Server over TLS: the same Dovecot has a `trustme` certificate for 127.0.0.1 and offers
  implicit TLS on a second listener (STARTTLS on the cleartext one, where cleartext LOGIN stays
  allowed, so the other workloads are as before). Targets: Dovecot direct over implicit TLS
  (the load generator does the handshake, a full one per page, and verifies the certificate);
  up-imapproxy with `force_tls yes` (STARTTLS to the cleartext port), imapproxy with
  `server_tls yes` (to the TLS port), both with `tls_ca_file` (the bench CA) and
  `tls_verify_server yes` and the SELECT cache on; clients speak cleartext to the proxies.
  The page and the quickack client as above, at c=1 and c=8, each target once per round in
  that order.
- Routing, PROXY protocol and metrics: imapproxy with the SELECT cache on (`ipx-on`) against
  three more instances of it, also SELECT cache on: `ipx-map` (`route_map`, a line
  `user000 127.0.0.1:PORT` per bench user), `ipx-sql` (`route_sql_url sqlite:///…/routes.db`,
  `route_sql_query SELECT host, port FROM routes WHERE login = :user`, `route_cache_ttl` at its
  default), both without `server_hostname` so that every login must be routed, and `ipx-pp`
  (`proxy_protocol_trusted_networks 127.0.0.1`, `metrics_listen 127.0.0.1:PORT`), to which the
  load generator sends a 28-byte PROXY v2 header (TCP4, client 192.0.2.10 with its real port,
  the real server address and port) right after connect, before reading the greeting. Its
  `/metrics` is scraped once after the rounds; `ipx-proxy` and `ipx-metrics` have one of
  the two each, to tell their costs apart. The page and the quickack client at c=8, in
  page windows, the six targets once per round, each round starting one target later; before
  the rounds each target gets two cached sessions per user (two logins of the user at once,
  then both LOGOUT) and an unmeasured 1 s window at c=32, also in a quick run, so that each
  holds the spare cached sessions `ipx-on` brings from the page cases.
- Workers (issue 13): imapproxy SELECT cache on with `workers 1` and with `workers 2`, each
  prepared as the options' targets are (two cached sessions per user, an unmeasured 1 s window
  at c=32), the page with the quickack client at c=8 and c=32, each round starting one target
  later; up-imapproxy SELECT cache on is their reference: its page-workload figure of the same
  run, or measured in the rounds when the page workload did not run. Then the same, with
  up-imapproxy always measured, *pinned*: every task of the three proxies' process trees on one
  CPU and every task of Dovecot's tree and of the load generator on the other
  (`sched_setaffinity`, as `taskset -a -p`; set back afterwards); other programs are not kept
  off either CPU. The counters (`TotalClientLogins`, `TotalServerConnectionsReused`) are read
  with `stats.Counters.summed()`, the exact sum of the workers' blocks; the hand-overs are the
  `LOGIN: '<user>' (<addr>) handed to worker N` lines of the proxy's log (INFO).
- Backend waits: imapproxy's `BackendWaits` counter (its statistics file, read before and after
  each round) over the round's pages; not counted for the other targets, whose waits are
  fixed by their design (see the summary).
- No network delay: everything is on loopback and this kernel has no `netem`, so no delay was
  added; a real network would add a round trip per backend wait.
"""


def render(results: Results, plan: Plan, date: str, elapsed_s: float, command: str) -> str:
    summaries = summaries_of(results)
    return "\n".join(
        [
            f"# Benchmark results, {date}\n",
            f"Command: `{command}`. Plan: {plan.describe()}.\n",
            table(["machine", ""], machine()),
            "## Summary\n",
            summary(results, plan, date, elapsed_s, command),
            "## Method\n",
            METHOD,
            "## Details\n",
            "Per unit: a page, a FETCH or a NOOP. Rates per second; latencies per unit. "
            "*other load*: the machine's busy CPU that neither the proxy, Dovecot nor the load "
            "generator explains (other programs, kernel work), as a share of both cores: the "
            "noise of the round.\n",
            details(summaries),
            "#### memory\n",
            memory_details(results.memory),
        ]
    )


def write_results(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.md"
    path.write_text(text, encoding="utf-8")
    return path


def publish(document: Path, block: str) -> bool:
    """Replace the summary between the markers of ``document``; False if it has none."""
    if not document.exists():
        return False
    text = document.read_text(encoding="utf-8")
    start, end = text.find(SUMMARY_START), text.find(SUMMARY_END)
    if start < 0 or end < start:
        return False
    new = text[: start + len(SUMMARY_START)] + "\n" + block.rstrip() + "\n" + text[end:]
    document.write_text(new, encoding="utf-8")
    return True

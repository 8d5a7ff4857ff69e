"""The workloads of the issue, each run against every target, alternating them per round.

- ``pages``: the webmail page at each concurrency, with the plain client socket (as PHP leaves
  it) and with the ``TCP_QUICKACK`` one; the ``limit`` target does the same SELECT + FETCH on
  sessions kept logged in to Dovecot (a perfect cache);
- ``tls``: the server over TLS: the same page with the quickack client at c=1 and c=8,
  against Dovecot direct over implicit TLS and each proxy (SELECT cache on) speaking TLS to
  Dovecot while its clients speak cleartext (``targets.start_tls_proxies``);
- ``options``: imapproxy's options against imapproxy SELECT cache on (``ipx-on``), the page
  with the quickack client at c=8 in page windows: routed by a route map and by SQLite, and
  with the PROXY protocol and metrics on, and with each of those alone
  (``targets.start_option_proxies``), each target first given two sessions per user; each
  metrics endpoint is scraped once afterwards, to show
  it was serving;
- ``workers``: imapproxy with ``workers 1`` and ``workers 2`` (issue 13), SELECT cache on, the
  page with the quickack client at c=8 and c=32, prepared as the options are; up-imapproxy
  SELECT cache on is the reference (its page-workload figures when that ran, else measured
  here); ``workers-pinned``: the same with the three proxies on one CPU and Dovecot and the
  load generator on the other (``pinning``), up-imapproxy always measured;
- ``bulk``: FETCH of whole 10 MiB (and 1 MiB) messages on one session, MiB/s;
- ``noop``: sequential NOOPs on one logged-in session, latency; bulk and NOOP also measure the
  floor relay (``bench.floor_relay``), the least any gevent relay adds;
- ``memory``: RSS of each proxy with 0, 1,000 and 10,000 cached sessions, and with the
  largest number of client connections open (separate proxy instances, started last).

A ``Bench`` holds what they share and measures one round: CPU of the proxy (its process tree,
user and system), of Dovecot (see ``procstat``) and of the load generator before and after,
Dovecot's logins from its log, and for imapproxy its ``BackendWaits``, ``TotalClientLogins``
and ``TotalServerConnectionsReused`` (from its statistics file, summed over its workers) before
and after, and the logins its log says were handed to another worker.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import pinning, procstat
from bench.figures import Cost, MemoryFigures, MemoryPoint, Round
from bench.loadgen import LoadGenerator
from bench.mailstore import PASSWORD, BenchDovecot, big_users, memory_users, webmail_users
from bench.pages import Job
from bench.plan import EXTRA_TARGETS, ONLY_IN, OWN_TARGETS, WORKER_TARGETS, Plan
from bench.targets import (
    Target,
    dovecot_pid,
    max_sessions,
    nofile_hard_limit,
    start_proxy,
    stop_process,
)
from imapproxy import stats

JOB_MARGIN_S = 60.0
MEMORY_CACHE_SIZE = 10_240  # the memory proxies' cache_size, where the descriptor limit allows
MEMORY_SETTLE_S = 0.5
BULK_SIZES = {"10 MiB": (5 << 20, 20 << 20), "1 MiB": (512 << 10, 5 << 20)}
LOGIN_MARK = b"Login: user=<"
LOG_DELAY_S = 0.02  # Dovecot's log process writes a login line a moment after the login
SCRAPE_TIMEOUT_S = 10.0
OPTIONS_WARMUP_S = 1.0  # per target, before the options' rounds (see ``options``)
SCRAPED_LOGINS = b"imapproxy_client_logins_total "
HANDOVER_MARK = b") handed to worker "  # imapproxy's INFO line ``LOGIN: 'u' (addr) handed to ...``


@dataclass(frozen=True)
class Case:
    """A workload variant: the rows of the report."""

    workload: str  # "page", "tls", "options", "bulk", "noop"
    client: str = "plain"  # "plain" or "quickack"
    concurrency: int = 1
    size: str = ""

    @property
    def label(self) -> str:
        if self.workload == "page":
            return f"page, {self.client} client, c={self.concurrency}"
        if self.workload == "tls":
            return f"page, server over TLS, {self.client} client, c={self.concurrency}"
        if self.workload == "options":
            return f"page, routing and PROXY + metrics, {self.client} client, c={self.concurrency}"
        if self.workload == "workers":
            return f"page, workers 1 and 2, {self.client} client, c={self.concurrency}"
        if self.workload == "workers-pinned":
            return (
                f"page, workers 1 and 2, proxies pinned to a CPU of their own, {self.client} "
                f"client, c={self.concurrency}"
            )
        if self.workload == "bulk":
            return f"bulk FETCH {self.size}"
        return "NOOP round trip"


@dataclass
class Results:
    rounds: dict[Case, dict[str, list[Round]]] = field(default_factory=dict)
    memory: dict[str, MemoryFigures] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, case: Case, target: Target, measured: Round) -> None:
        self.rounds.setdefault(case, {}).setdefault(target.key, []).append(measured)


@dataclass
class Bench:
    """What the workloads share."""

    plan: Plan
    dovecot: BenchDovecot
    targets: list[Target]
    proxies: dict[str, subprocess.Popen[bytes]]  # and the floor relay: stopped before memory
    loadgen: LoadGenerator
    workdir: Path
    progress: Callable[[str], None]
    expected: tuple[tuple[str, int], ...] = ()
    log_offset: int = 0
    proxy_log_offsets: dict[str, int] = field(default_factory=dict)

    @property
    def users(self) -> list[str]:
        return webmail_users(self.plan.users)

    def targets_of(self, workload: str) -> list[Target]:
        """The targets ``workload`` measures (see ``plan.ONLY_IN``), in their order."""
        if workload in OWN_TARGETS:
            extra = EXTRA_TARGETS.get(workload, ())
            return [t for t in self.targets if workload in ONLY_IN.get(t.key, ()) or t.key in extra]
        return [t for t in self.targets if workload in ONLY_IN.get(t.key, (workload,))]

    def job(
        self,
        script: str,
        target: Target,
        threads: list[list[str]],
        *,
        quickack: bool = False,
        duration_s: float = float("inf"),
        seed: int = 0,
        size_range: tuple[int, int] = (0, 1 << 40),
    ) -> Job:
        return Job(
            script=script,
            host=target.host,
            port=target.port,
            quickack=quickack,
            threads=tuple(tuple(users) for users in threads),
            password=PASSWORD,
            duration_s=duration_s,
            timeout_s=self.plan.timeout_s,
            seed=seed,
            expected=self.expected,
            size_range=size_range,
            tls_ca_file=target.tls_ca_file,
            proxy_source=target.proxy_source,
        )

    def max_wait_s(self, job: Job, units: int = 1) -> float:
        window = job.duration_s if job.duration_s != float("inf") else 0.0
        return window + units * 4 * job.timeout_s + JOB_MARGIN_S

    def measure(self, target: Target, job: Job) -> Round:
        """Run ``job`` once and account for what it cost."""
        self.new_backend_logins()  # forget those of warm-ups and earlier rounds
        self.new_handovers(target)
        before = self.costs(target)
        outcome = self.loadgen.run(job, self.max_wait_s(job))
        after = self.costs(target)
        time.sleep(LOG_DELAY_S)
        cost = Cost(
            proxy_cpu_s=difference(after.proxy_cpu_s, before.proxy_cpu_s),
            proxy_system_s=difference(after.proxy_system_s, before.proxy_system_s),
            proxy_logins=difference_int(after.proxy_logins, before.proxy_logins),
            proxy_reused=difference_int(after.proxy_reused, before.proxy_reused),
            handovers=self.new_handovers(target),
            dovecot_cpu_s=after.dovecot_cpu_s - before.dovecot_cpu_s,
            loadgen_cpu_s=after.loadgen_cpu_s - before.loadgen_cpu_s,
            backend_logins=self.new_backend_logins(),
            machine_cpu_s=after.machine_cpu_s - before.machine_cpu_s,
            wall_s=after.wall_s - before.wall_s,
            backend_waits=difference_int(after.backend_waits, before.backend_waits),
        )
        return Round.of(outcome.tally, outcome.rate, cost)

    def costs(self, target: Target) -> Cost:
        counters = proxy_counters(target)
        proxy = procstat.tree_times(target.pid) if target.pid else None
        return Cost(
            proxy_cpu_s=proxy.total_s if proxy else None,
            proxy_system_s=proxy.system_s if proxy else None,
            dovecot_cpu_s=procstat.tree_cpu_s(dovecot_pid(self.dovecot)),
            loadgen_cpu_s=sum(procstat.process_cpu_s(pid) for pid in self.loadgen.pids()),
            machine_cpu_s=procstat.machine_busy_s(),
            wall_s=time.monotonic(),
            backend_waits=counters.get("BackendWaits") if counters else None,
            proxy_logins=counters.get("TotalClientLogins") if counters else None,
            proxy_reused=counters.get("TotalServerConnectionsReused") if counters else None,
        )

    def new_handovers(self, target: Target) -> int | None:
        """Logins ``target``'s log says it handed to another worker since the last call (whole
        lines only); None for a target without workers."""
        if target.log_path is None or target.key not in WORKER_TARGETS:
            return None
        offset = self.proxy_log_offsets.get(target.key, 0)
        try:
            with open(target.log_path, "rb") as log:
                log.seek(offset)
                text = log.read()
        except OSError:
            return None
        text = text[: text.rfind(b"\n") + 1]
        self.proxy_log_offsets[target.key] = offset + len(text)
        return text.count(HANDOVER_MARK)

    def new_backend_logins(self) -> int:
        """Logins Dovecot logged since the last call (its info log)."""
        path = self.dovecot.root / "dovecot.info.log"
        try:
            with open(path, "rb") as log:
                log.seek(self.log_offset)
                text = log.read()
        except OSError:
            return 0
        self.log_offset += len(text)
        return text.count(LOGIN_MARK)


def difference(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def difference_int(after: int | None, before: int | None) -> int | None:
    return None if after is None or before is None else after - before


def proxy_counters(target: Target) -> dict[str, int] | None:
    """imapproxy's counters so far, exactly summed over its workers (``Counters.summed``: the
    totals block the supervisor writes lags by up to its 0.25 s sample); None for other
    targets or an unreadable file."""
    if target.stat_path is None:
        return None
    counters = stats.read_file(str(target.stat_path))
    return None if counters is None else counters.summed()


def split(users: list[str], threads: int) -> list[list[str]]:
    """``users`` dealt out to ``threads`` threads (a partition)."""
    return [users[i::threads] for i in range(threads) if users[i::threads]]


# -- warm-up ------------------------------------------------------------------------------------


def warm_up(bench: Bench) -> None:
    """Two pages per user direct (Dovecot indexes and caches), one through each proxy.

    The direct pages also record each user's header bytes, which every later page must match.
    """
    direct = next(t for t in bench.targets if t.key == "dovecot")
    for _ in range(2):
        outcome = bench.loadgen.run(
            bench.job("warm", direct, split(bench.users, 8), quickack=True), JOB_MARGIN_S * 5
        )
        check_warm(outcome.tally.errors, direct)
    bench.expected = tuple(sorted(outcome.tally.observed.items()))
    warmed = bench.targets_of("page") + bench.targets_of("tls") + bench.targets_of("options")
    warmed += bench.targets_of("workers")
    for target in dict.fromkeys(warmed):  # ipx-on is in two of them: warmed once
        if target.pid is not None:
            outcome = bench.loadgen.run(
                bench.job("warm", target, split(bench.users, 8), quickack=True), JOB_MARGIN_S * 5
            )
            check_warm(outcome.tally.errors, target)
    bench.new_backend_logins()


def check_warm(errors: dict[str, int], target: Target) -> None:
    if errors:
        raise RuntimeError(f"warm-up through {target.key} failed: {dict(errors)}")


# -- pages --------------------------------------------------------------------------------------


def page_job(bench: Bench, target: Target, client: str, concurrency: int, window_s: float) -> Job:
    quickack = client == "quickack"
    if target.key == "limit":  # one kept session per user, the users shared out to the threads
        return bench.job(
            "limit",
            target,
            split(bench.users, concurrency),
            quickack=quickack,
            duration_s=window_s,
            seed=concurrency,
        )
    return bench.job(
        "webmail",
        target,
        [bench.users] * concurrency,
        quickack=quickack,
        duration_s=window_s,
        seed=concurrency,
    )


def pages(bench: Bench, results: Results) -> None:
    plan = bench.plan
    for client in ("plain", "quickack"):
        for concurrency in plan.concurrencies:
            case = Case("page", client, concurrency)
            page_case(bench, results, case, bench.targets_of("page"), plan.page_window_s)


def tls_pages(bench: Bench, results: Results) -> None:
    """The server over TLS: the page with the quickack client, measured as in ``pages``."""
    plan = bench.plan
    for concurrency in plan.tls_concurrencies:
        case = Case("tls", "quickack", concurrency)
        page_case(bench, results, case, bench.targets_of("tls"), plan.tls_window_s)


def page_case(
    bench: Bench, results: Results, case: Case, targets: list[Target], window_s: float
) -> None:
    """A warm-up window per target (0 s still logs in the limit's sessions), then the rounds."""
    plan = bench.plan
    bench.progress(case.label)
    for target in targets:
        if plan.warmup_window_s or target.key == "limit":
            job = page_job(bench, target, case.client, case.concurrency, plan.warmup_window_s)
            bench.loadgen.run(job, plan.warmup_window_s + JOB_MARGIN_S * 2)
    for _ in range(plan.rounds):
        for target in targets:
            job = page_job(bench, target, case.client, case.concurrency, window_s)
            results.add(case, target, bench.measure(target, job))


def options(bench: Bench, results: Results) -> None:
    """imapproxy's options against ``ipx-on``: the page as in ``pages``, quickack client.

    Each target first gets two sessions per user (``pair``) and an unmeasured window at the
    page cases' largest concurrency, also in a quick run: ``ipx-on`` comes out of the page
    cases with a spare cached session for each user that two clients asked for at once, and a
    target without them would pay Dovecot logins that are no cost of its option. Then the
    rounds, each starting one target later than the last, so that no target always follows the
    same one.
    """
    plan = bench.plan
    case = Case("options", "quickack", plan.options_concurrency)
    measured = bench.targets_of("options")
    bench.progress(case.label)
    for target in measured:
        prepare(bench, target, case.client)
    rotated_rounds(bench, results, case, measured)
    for target in measured:
        if target.metrics_url:
            results.notes.append(scraped(target))


def prepare(bench: Bench, target: Target, client: str) -> None:
    """Two cached sessions per user, then an unmeasured window at the largest concurrency."""
    pairs = bench.job("pair", target, split(bench.users, 8), quickack=True)
    check_warm(bench.loadgen.run(pairs, JOB_MARGIN_S * 5).tally.errors, target)
    job = page_job(bench, target, client, max(bench.plan.concurrencies), OPTIONS_WARMUP_S)
    bench.loadgen.run(job, OPTIONS_WARMUP_S + JOB_MARGIN_S * 2)


def rotated_rounds(bench: Bench, results: Results, case: Case, measured: list[Target]) -> None:
    """The rounds of ``case``, each starting one target later than the last."""
    for number in range(bench.plan.rounds):
        shift = number % len(measured)
        for target in measured[shift:] + measured[:shift]:
            job = page_job(bench, target, case.client, case.concurrency, bench.plan.page_window_s)
            results.add(case, target, bench.measure(target, job))


def workers(bench: Bench, results: Results) -> None:
    """imapproxy with ``workers 1`` and ``workers 2``, as the options are measured, at each of
    ``plan.workers_concurrencies``; then the same pinned (``pinned_workers``).

    up-imapproxy SELECT cache on is measured with them only when the page workload did not
    give its quickack figure at that concurrency in this run.
    """
    measured = bench.targets_of("workers")
    reference = next(t for t in bench.targets if t.key == "up-on")
    for target in [reference, *measured]:  # up-imapproxy too: it is measured when pinned
        prepare(bench, target, "quickack")
    for concurrency in bench.plan.workers_concurrencies:
        case = Case("workers", "quickack", concurrency)
        bench.progress(case.label)
        page_case_ran = "up-on" in results.rounds.get(Case("page", "quickack", concurrency), {})
        rotated_rounds(bench, results, case, measured if page_case_ran else [reference, *measured])
    pinned_workers(bench, results)


def pinned_workers(bench: Bench, results: Results) -> None:
    """The workers case with the three proxies' process trees on one CPU and Dovecot's and the
    load generator's on the other (``pinning.pinned``); said in a note, also when impossible."""
    measured = bench.targets_of("workers-pinned")
    proxies = [t.pid for t in measured if t.pid is not None]
    others = [dovecot_pid(bench.dovecot), *bench.loadgen.pids()]
    try:
        with pinning.pinned(proxies, others) as (rest, proxy):
            for concurrency in bench.plan.workers_concurrencies:
                case = Case("workers-pinned", "quickack", concurrency)
                bench.progress(case.label)
                rotated_rounds(bench, results, case, measured)
    except pinning.PinningError as error:
        results.notes.append(f"Workers, pinned: not measured: {error}.")
        return
    results.notes.append(
        f"Workers, pinned: the proxies (every process and thread of up-imapproxy's, of workers "
        f"1's and of workers 2's trees) on CPU {proxy}, Dovecot's and the load generator's on "
        f"CPU {rest}, with `sched_setaffinity` (as `taskset -a -p`); other programs could run "
        "on both."
    )


def scraped(target: Target) -> str:
    """One scrape of ``target``'s metrics endpoint, said as a note of the report."""
    try:
        with urllib.request.urlopen(target.metrics_url, timeout=SCRAPE_TIMEOUT_S) as response:
            body = response.read()
    except OSError as error:
        return f"{target.key}: its metrics endpoint did not answer after the rounds ({error})."
    logins = next(
        (
            line[len(SCRAPED_LOGINS) :].decode()
            for line in body.splitlines()
            if line.startswith(SCRAPED_LOGINS)
        ),
        "?",
    )
    return (
        f"{target.key}: one scrape of `/metrics` after the rounds answered {len(body):,} bytes, "
        f"`imapproxy_client_logins_total` {logins}."
    )


# -- bulk and NOOP ------------------------------------------------------------------------------


def bulk(bench: Bench, results: Results) -> None:
    plan = bench.plan
    owners = big_users()
    for size, size_range in BULK_SIZES.items():
        case = Case("bulk", size=size)
        bench.progress(case.label)
        measured = bench.targets_of("bulk")
        for number in range(first_round(plan), plan.rounds + 1):  # round 0 warms up
            for target in measured:
                owner = owners[number % len(owners)]
                job = bench.job(
                    "bulk", target, [[owner]], duration_s=plan.bulk_window_s, size_range=size_range
                )
                measured_round = bench.measure(target, job)
                if number:
                    results.add(case, target, measured_round)


def first_round(plan: Plan) -> int:
    """0 to begin with an unmeasured warm-up round, 1 without one (quick)."""
    return 0 if plan.warmup_window_s else 1


def noop(bench: Bench, results: Results) -> None:
    plan = bench.plan
    case = Case("noop")
    bench.progress(case.label)
    measured = bench.targets_of("noop")
    for number in range(first_round(plan), plan.rounds + 1):  # round 0 warms up
        for target in measured:
            job = bench.job("noop", target, [[bench.users[number]]], duration_s=plan.noop_window_s)
            measured_round = bench.measure(target, job)
            if number:
                results.add(case, target, measured_round)


# -- memory -------------------------------------------------------------------------------------


def memory(bench: Bench, stack: contextlib.ExitStack, results: Results) -> None:
    """Stop the earlier workloads' relays, then for each proxy a fresh instance, sessions added.

    Dovecot is restarted before each: the thousands of imap processes a proxy's sessions leave
    idle (``service_count`` 256) would all wake for every new connection until their
    ``idle_kill`` minute is over, and slow the next proxy's logins tenfold.
    """
    bench.loadgen.broadcast("reset")
    for process in bench.proxies.values():
        stop_process(process)
    wanted = max(bench.plan.memory_sessions)
    largest = max_sessions(wanted)
    if largest < wanted:
        results.notes.append(
            f"Memory: {largest:,} sessions instead of {wanted:,}: the hard limit on open files "
            f"is {nofile_hard_limit():,} here (no CAP_SYS_RESOURCE to raise it), and an open "
            "client connection costs a proxy two descriptors."
        )
    points = sorted({min(n, largest) for n in bench.plan.memory_sessions})
    # up-imapproxy takes 2 * cache_size + 10 descriptors, imapproxy checks for about as many
    cache_size = min(MEMORY_CACHE_SIZE, (nofile_hard_limit() - 100) // 2)
    for product in ("up-imapproxy", "imapproxy"):
        bench.progress(f"memory, {product}")
        bench.dovecot.restart()
        results.memory[product] = memory_of(bench, stack, product, points, cache_size)


def memory_of(
    bench: Bench, stack: contextlib.ExitStack, product: str, points: list[int], cache_size: int
) -> MemoryFigures:
    target, process = start_proxy(
        stack,
        product,
        bench.dovecot,
        bench.workdir,
        select_cache=False,
        name="memory",
        cache_size=cache_size,
    )
    assert target.pid is not None
    port = bench.dovecot.port
    time.sleep(MEMORY_SETTLE_S)
    baseline = procstat.established_to(port)
    figures = MemoryFigures(procstat.rss_kib(target.pid))
    users = memory_users(points[-1])

    def point(sessions: int, state: str, errors: int) -> MemoryPoint:
        time.sleep(MEMORY_SETTLE_S)
        held = procstat.established_to(port) - baseline
        return MemoryPoint(sessions, state, procstat.rss_kib(target.pid or 0), held, errors)

    done = 0
    for sessions in points:  # LOGIN + LOGOUT of new users: each leaves a cached session
        job = bench.job("cycle", target, split(users[done:sessions], 8), quickack=True)
        outcome = bench.loadgen.run(job, bench.max_wait_s(job, units=sessions - done))
        figures.points.append(point(sessions, "cached", sum(outcome.tally.errors.values())))
        bench.progress(f"memory, {product}: {sessions:,} sessions cached")
        done = sessions
    job = bench.job("hold", target, split(users, 8), quickack=True)  # all logged in at once
    outcome = bench.loadgen.run(job, bench.max_wait_s(job, units=len(users)))
    figures.points.append(point(len(users), "open", sum(outcome.tally.errors.values())))
    bench.progress(f"memory, {product}: {len(users):,} client connections open")
    bench.loadgen.broadcast("release")
    stop_process(process)
    bench.progress(f"memory, {product}: stopped")
    return figures

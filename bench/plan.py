"""How long and how much: the default run (about 11 minutes) and ``--quick`` (about 3).

Every duration is a window per round and target; a round of a workload measures every target
once (those of ``ONLY_IN`` only in their workloads; a workload of ``OWN_TARGETS`` only its
own, with ``EXTRA_TARGETS`` for those that add a reference), in the order of
``TARGET_ORDER``, so that machine noise hits all alike. Before the rounds of a case, each
target gets one unmeasured warm-up window (not in a quick run). A page stuck in
up-imapproxy's listen queue (backlog 5) holds its round up to ``timeout_s`` more.
"""

from __future__ import annotations

from dataclasses import dataclass

TARGET_ORDER = (
    "dovecot",
    "limit",
    "floor",
    "up-off",
    "ipx-off",
    "up-on",
    "ipx-on",
    "dovecot-tls",
    "up-tls",
    "ipx-tls",
    "ipx-map",
    "ipx-sql",
    "ipx-pp",
    "ipx-proxy",
    "ipx-metrics",
    "ipx-w1",
    "ipx-w2",
)
# Targets in some workloads only: the limit is a page without login and logout; the floor
# relay (bench.floor_relay) is correct only for one command at a time on one session; the
# server over TLS (direct over implicit TLS, and each proxy speaking TLS to Dovecot) is its
# own workload.
TLS_TARGETS = ("dovecot-tls", "up-tls", "ipx-tls")
# imapproxy's options (issues 11 and 12), each against imapproxy SELECT cache on (``ipx-on``) in
# its own workload: routed by a route map and by SQLite, with PROXY protocol and metrics on,
# and with each of those two alone.
OPTION_TARGETS = ("ipx-map", "ipx-sql", "ipx-pp", "ipx-proxy", "ipx-metrics")
# imapproxy with ``workers 1`` and ``workers 2`` (issue 13), SELECT cache on, in their own
# workload, once as the machine runs them and once with the proxies on one CPU and Dovecot and
# the load generator on the other; up-imapproxy SELECT cache on is their reference (in the
# pinned one always, in the other only when the page workload did not run: its figures then).
WORKER_TARGETS = {"ipx-w1": 1, "ipx-w2": 2}  # key: the ``workers`` setting
WORKER_WORKLOADS = ("workers", "workers-pinned")
ONLY_IN = {
    "limit": ("page",),
    "floor": ("bulk", "noop"),
    **{key: ("tls",) for key in TLS_TARGETS},
    **{key: ("options",) for key in OPTION_TARGETS},
    **{key: WORKER_WORKLOADS for key in WORKER_TARGETS},
}
# workloads that measure only the targets ``ONLY_IN`` gives them
OWN_TARGETS = ("tls", "options", *WORKER_WORKLOADS)
EXTRA_TARGETS = {"options": ("ipx-on",), "workers-pinned": ("up-on",)}  # ... and these
# The workloads in the order a run does them (``python -m bench.run --only`` picks some).
WORKLOADS = ("page", "tls", "options", "workers", "bulk", "noop", "memory")
PROXY_CLIENT_ADDRESS = "192.0.2.10"  # RFC 5737 TEST-NET-1: the client the PROXY header names
WEBMAIL_USERS = 200
MEMORY_SESSIONS = (1_000, 10_000)


@dataclass(frozen=True)
class Plan:
    name: str
    rounds: int
    page_window_s: float
    warmup_window_s: float
    concurrencies: tuple[int, ...]
    bulk_window_s: float
    noop_window_s: float
    memory_sessions: tuple[int, ...]  # cached-session points; the largest also held open
    tls_window_s: float  # the server over TLS: page windows, quickack client
    tls_concurrencies: tuple[int, ...] = (1, 8)
    options_concurrency: int = 8  # the options: page windows, quickack client
    workers_concurrencies: tuple[int, ...] = (8, 32)  # workers 1 and 2: page windows, quickack
    workers: int = 2  # load-generator processes (the machine has 2 cores)
    timeout_s: float = 5.0  # per I/O: connect, each reply
    users: int = WEBMAIL_USERS

    def describe(self) -> str:
        return (
            f"{self.name}: {self.rounds} rounds, page windows of {self.page_window_s:g} s "
            + (f"(warm-up {self.warmup_window_s:g} s)" if self.warmup_window_s else "(no warm-up)")
            + f", server over TLS {self.tls_window_s:g} s at c="
            + ", ".join(str(c) for c in self.tls_concurrencies)
            + f", routing and PROXY + metrics {self.page_window_s:g} s at "
            f"c={self.options_concurrency}, workers 1 and 2 {self.page_window_s:g} s at c="
            + ", ".join(str(c) for c in self.workers_concurrencies)
            + f" (also pinned), bulk {self.bulk_window_s:g} s, "
            f"NOOP {self.noop_window_s:g} s, memory at "
            + ", ".join(f"{n:,}" for n in self.memory_sessions)
            + f" sessions; {self.workers} load-generator processes; I/O time-out "
            f"{self.timeout_s:g} s"
        )


DEFAULT = Plan(
    name="default",
    rounds=3,
    page_window_s=2.0,
    warmup_window_s=0.3,
    concurrencies=(1, 8, 32),
    bulk_window_s=0.7,
    noop_window_s=0.7,
    memory_sessions=MEMORY_SESSIONS,
    tls_window_s=2.0,
)

QUICK = Plan(
    name="quick",
    rounds=2,
    page_window_s=0.5,
    warmup_window_s=0.0,  # no warm-up window per case: the warm-up at the start must do
    concurrencies=(1, 8, 32),
    bulk_window_s=0.25,
    noop_window_s=0.2,
    memory_sessions=(1_000,),  # the 10,000 point takes minutes: skipped, and the report says so
    tls_window_s=0.5,
    timeout_s=2.0,  # up-imapproxy's full listen queue stalls pages for seconds at c=32
)

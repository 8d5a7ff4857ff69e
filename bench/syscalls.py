"""``python -m bench.syscalls [--pages N] [--users N] [--workers]``: system calls per page.

Starts a private Dovecot (seeded as the benchmark's, with fewer users), up-imapproxy and
imapproxy each with the SELECT cache off and on (the benchmark's settings, ``bench.targets``)
and a one-process load generator. Each proxy is warmed with one page per user (every session
cached, every SELECT entry filled); then ``strace -c -f -p PID`` is attached to it (counts
only; ``-f`` takes every thread, up-imapproxy's thread per client included), a fixed number of
pages runs at c=1 with the quickack client, and strace is stopped with SIGINT, which makes it
print its summary. The same attach with no pages, for as long, gives what the proxy does on
its own (timers), shown apart. Prints, per system call, the calls per page of each proxy and
the total per page. Must run as root (the proxies drop to nobody; strace attaches to them).

``--workers``: imapproxy SELECT cache on with ``workers 1`` and with ``workers 2`` instead (issue
13): strace is attached to every process of the proxy's tree (the supervisor, each worker, the
privileged file readers), and the calls of all of them are added up.

strace slows every traced call down, so the pages run slower than in ``bench.run``: only the
counts mean something here, not the times (which are not shown).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import procstat
from bench.loadgen import LoadGenerator
from bench.mailstore import PASSWORD, BenchDovecot, seed_all, webmail_users
from bench.pages import Job
from bench.report import table
from bench.targets import Target, direct_targets, start_dovecot, start_proxy

STRACE = shutil.which("strace") or "/usr/bin/strace"
PAGES = 200
USERS = 20
ATTACH_TIMEOUT_S = 10.0
ATTACH_SETTLE_S = 0.2  # after the main thread is traced: the other threads follow at once
STRACE_STOP_TIMEOUT_S = 10.0
JOB_TIMEOUT_S = 120.0
IO_TIMEOUT_S = 5.0
# The column, the product, the SELECT cache and more settings of each proxy traced.
Traceable = tuple[str, str, bool, dict[str, Any]]
PROXIES: tuple[Traceable, ...] = (
    ("up-imapproxy, SELECT cache off", "up-imapproxy", False, {}),
    ("imapproxy, SELECT cache off", "imapproxy", False, {}),
    ("up-imapproxy, SELECT cache on", "up-imapproxy", True, {}),
    ("imapproxy, SELECT cache on", "imapproxy", True, {}),
)
WORKER_PROXIES: tuple[Traceable, ...] = (
    ("imapproxy, SELECT cache on, `workers 1`", "imapproxy", True, {"workers": 1}),
    ("imapproxy, SELECT cache on, `workers 2`", "imapproxy", True, {"workers": 2}),
)


@dataclass(frozen=True)
class Calls:
    """One line of ``strace -c``: a system call, how often it was made, how often it failed."""

    name: str
    calls: int
    errors: int


@dataclass(frozen=True)
class Traced:
    """What a proxy did during the pages, and on its own for as long."""

    label: str
    target: Target
    pages: int
    calls: dict[str, Calls]
    idle_calls: int

    def per_page(self, name: str) -> tuple[float, float] | None:
        found = self.calls.get(name)
        return None if found is None else (found.calls / self.pages, found.errors / self.pages)

    def total_per_page(self) -> float:
        return sum(c.calls for c in self.calls.values()) / self.pages


# -- strace -------------------------------------------------------------------------------------


def parse_summary(text: str) -> dict[str, Calls]:
    """The rows of a ``strace -c`` table (the ``total`` row left out).

    Columns are cut where the header's dashed rule cuts them: the usecs/call and errors cells
    may be blank, so splitting on blanks would shift them.
    """
    lines = text.splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("------")]
    if len(rules) < 2:
        return {}
    spans = column_spans(lines[rules[0]])
    found = {}
    for line in lines[rules[0] + 1 : rules[1]]:
        cells = [line[start:end].strip() for start, end in spans]
        name = cells[-1]
        found[name] = Calls(name, int(cells[3] or 0), int(cells[4] or 0))
    return found


def column_spans(rule: str) -> list[tuple[int, int]]:
    """(start, end) of each run of dashes; the last one runs to the end of the line."""
    spans, start = [], 0
    for part in rule.split(" "):
        if part:
            spans.append((start, start + len(part)))
        start += len(part) + 1
    last_start = spans[-1][0]
    return spans[:-1] + [(last_start, 10_000)]


def tracer_pid(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    return 0


@contextlib.contextmanager
def strace_counting(pid: int, output: Path) -> Iterator[None]:
    """``strace -c -f -p PID`` for ``pid`` and each of its descendants for the time of the
    block; the summary of them all written to ``output``."""
    pids = [pid, *procstat.descendants(pid)]
    argv = [STRACE, "-c", "-f", "-o", str(output)]
    argv += [arg for one in pids for arg in ("-p", str(one))]
    tracer = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for one in pids:
            wait_traced(one, tracer)
        yield
    finally:
        tracer.send_signal(signal.SIGINT)
        try:
            tracer.wait(timeout=STRACE_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait()


def wait_traced(pid: int, tracer: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + ATTACH_TIMEOUT_S
    while tracer_pid(pid) != tracer.pid:
        if tracer.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"strace did not attach to {pid}")
        time.sleep(0.02)
    time.sleep(ATTACH_SETTLE_S)


# -- the pages ----------------------------------------------------------------------------------


def page_job(target: Target, users: list[str], expected: dict[str, int], script: str) -> Job:
    return Job(
        script=script,
        host=target.host,
        port=target.port,
        quickack=True,
        threads=(tuple(users),),
        password=PASSWORD,
        timeout_s=IO_TIMEOUT_S,
        expected=tuple(sorted(expected.items())),
    )


def run_pages(loadgen: LoadGenerator, job: Job) -> float:
    """Run ``job`` (one thread, c=1); the seconds it took. Any error stops the tool."""
    started = time.monotonic()
    outcome = loadgen.run(job, JOB_TIMEOUT_S)
    if outcome.tally.errors:
        raise RuntimeError(f"pages through {job.port} failed: {dict(outcome.tally.errors)}")
    return time.monotonic() - started


def trace(loadgen: LoadGenerator, label: str, target: Target, job: Job, workdir: Path) -> Traced:
    assert target.pid is not None
    pages_file, idle_file = workdir / f"{target.key}.strace", workdir / f"{target.key}.idle"
    with strace_counting(target.pid, pages_file):
        took_s = run_pages(loadgen, job)
    with strace_counting(target.pid, idle_file):
        time.sleep(took_s)
    calls = parse_summary(pages_file.read_text())
    idle = parse_summary(idle_file.read_text())
    pages = len(job.threads[0])
    return Traced(label, target, pages, calls, sum(c.calls for c in idle.values()))


def measure(root: Path, pages: int, users: int, workers: bool = False) -> list[Traced]:
    with contextlib.ExitStack() as stack:
        dovecot = BenchDovecot(root, fast=True)
        seed_all(dovecot, users, 0)
        start_dovecot(stack, dovecot)
        loadgen = LoadGenerator(1)
        stack.callback(loadgen.close)
        names = webmail_users(users)
        direct = direct_targets(dovecot)[0]
        expected: dict[str, int] = {}
        for _ in range(2):  # Dovecot indexes the mailboxes; each user's header bytes noted
            expected = loadgen.run(
                page_job(direct, names, {}, "warm"), JOB_TIMEOUT_S
            ).tally.observed
        sequence = [names[i % len(names)] for i in range(pages)]
        found = []
        for number, (label, product, select_cache, settings) in enumerate(
            WORKER_PROXIES if workers else PROXIES
        ):
            target, _ = start_proxy(
                stack,
                product,
                dovecot,
                root / "proxies",
                select_cache=select_cache,
                key=f"traced{number}",
                **settings,
            )
            run_pages(loadgen, page_job(target, names, expected, "warm"))
            job = page_job(target, sequence, expected, "counted")
            found.append(trace(loadgen, label, target, job, root))
        return found


# -- output -------------------------------------------------------------------------------------


def cell(traced: Traced, name: str) -> str:
    found = traced.per_page(name)
    if found is None:
        return "—"
    calls, errors = found
    return f"{calls:.2f}" + (f" ({errors:.2f} failed)" if errors else "")


def render(found: list[Traced]) -> str:
    names = {name for traced in found for name in traced.calls}
    busiest = sorted(
        names, key=lambda n: -max(t.calls[n].calls if n in t.calls else 0 for t in found)
    )
    header = ["system call", *(t.label for t in found)]
    rows = [[name, *(cell(t, name) for t in found)] for name in busiest]
    rows.append(["**total per page**", *(f"**{t.total_per_page():.1f}**" for t in found)])
    rows.append(
        [
            "calls on its own for as long, per page",
            *(f"{t.idle_calls / t.pages:.2f}" for t in found),
        ]
    )
    return table(header, rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.syscalls", description=__doc__)
    parser.add_argument("--pages", type=int, default=PAGES, help="pages traced per proxy")
    parser.add_argument("--users", type=int, default=USERS, help="webmail users (cycled)")
    parser.add_argument(
        "--workers", action="store_true", help="imapproxy with workers 1 and workers 2 instead"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("run as root: the proxies drop to nobody and strace attaches to them")
    if not os.path.exists(STRACE):
        raise SystemExit(f"missing {STRACE}: install strace (make deps)")
    root = Path(tempfile.mkdtemp(prefix="imapproxy-syscalls-"))
    os.chmod(root, 0o755)  # Dovecot's mail user must traverse it
    try:
        found = measure(root, args.pages, args.users, args.workers)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"System calls per page: {args.pages} pages at c=1, quickack client, `strace -c -f`\n")
    print(render(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())

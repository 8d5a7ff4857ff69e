"""``python -m bench.run [--quick] [--only WORKLOAD ...] [--no-publish] [--keep]``: the benchmark.

Seeds and starts a private Dovecot (with a trustme certificate for its TLS listener),
up-imapproxy and imapproxy (each SELECT cache off and on, and each once more speaking TLS to
Dovecot), imapproxy with its options (routed by a map and by SQLite, PROXY protocol and
metrics on), imapproxy with ``workers 1`` and ``workers 2``, and the floor relay in front of
it, the load generator, runs every workload against its targets (or those of ``--only``),
prints the summary and writes the report to ``bench/results/<date>.md`` (``<date>-quick.md``
for a quick run, ``<date>[-quick]-only-<workloads>.md`` with ``--only``). A default run of every
workload also puts the summary into BENCHMARKS.md (not with ``--no-publish``; a quick run or
one with ``--only`` never does). Everything started is stopped at the end,
on Ctrl-C, SIGTERM or an error; the temporary directory is removed unless ``--keep``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from bench import report
from bench.loadgen import LoadGenerator
from bench.mailstore import BenchDovecot, seed_all, webmail_users, write_pki
from bench.plan import DEFAULT, QUICK, TARGET_ORDER, WORKLOADS, Plan
from bench.targets import (
    IMAPPROXYD,
    REPO,
    Target,
    direct_targets,
    direct_tls_target,
    start_dovecot,
    start_floor_relay,
    start_option_proxies,
    start_proxy,
    start_tls_proxies,
    start_worker_proxies,
)
from bench.workloads import (
    Bench,
    Results,
    bulk,
    memory,
    noop,
    options,
    pages,
    tls_pages,
    warm_up,
    workers,
)
from tests.support.dovecot import DOVECOT

RESULTS_DIR = REPO / "bench" / "results"
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
DOVECOT_CLIENT_LIMIT = 25_000  # default_client_limit: room for the memory workload's sessions


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the short run (about 3 minutes)")
    parser.add_argument(
        "--no-publish", action="store_true", help="leave BENCHMARKS.md alone (default run)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=WORKLOADS,
        metavar="WORKLOAD",
        help=f"run only these workloads ({', '.join(WORKLOADS)}); every target is still started",
    )
    return parser.parse_args(argv)


class Progress:
    """Progress lines on stderr, with the time since the start."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, text: str) -> None:
        print(f"[{self.elapsed_s():6.1f} s] {text}", file=sys.stderr, flush=True)

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started


def check_prerequisites() -> None:
    missing = [path for path in (DOVECOT, IMAPPROXYD) if not os.path.exists(path)]
    if missing:
        raise SystemExit(
            f"missing {', '.join(missing)}: install dovecot-imapd and imapproxy (make deps)"
        )
    if os.geteuid() != 0:
        raise SystemExit("run as root: up-imapproxy starts as root to drop to nobody")


def stop_on_sigterm() -> None:
    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def run_all(
    plan: Plan,
    root: Path,
    stack: contextlib.ExitStack,
    progress: Progress,
    chosen: Sequence[str] = WORKLOADS,
) -> Results:
    progress(f"seeding Dovecot in {root}")
    pki = write_pki(root / "pki")
    dovecot = BenchDovecot(
        root, fast=True, client_limit=DOVECOT_CLIENT_LIMIT, ssl_cert=pki.cert, ssl_key=pki.key
    )
    seed_all(dovecot, plan.users, max(plan.memory_sessions))
    start_dovecot(stack, dovecot)
    loadgen = LoadGenerator(plan.workers)
    stack.callback(loadgen.close)
    targets = direct_targets(dovecot) + [direct_tls_target(dovecot, pki)]
    proxies: dict[str, subprocess.Popen[bytes]] = {}
    progress("starting up-imapproxy and imapproxy, SELECT cache off and on")
    for select_cache in (False, True):
        for product in ("up-imapproxy", "imapproxy"):
            add(
                targets,
                proxies,
                start_proxy(stack, product, dovecot, root / "proxies", select_cache=select_cache),
            )
    progress("starting both proxies with TLS to Dovecot")
    for started in start_tls_proxies(stack, dovecot, pki, root / "proxies"):
        add(targets, proxies, started)
    progress("starting imapproxy routed (map, SQLite) and with PROXY protocol and metrics")
    users = webmail_users(plan.users)
    for started in start_option_proxies(stack, dovecot, root / "proxies", users):
        add(targets, proxies, started)
    progress("starting imapproxy with workers 1 and workers 2")
    for started in start_worker_proxies(stack, dovecot, root / "proxies"):
        add(targets, proxies, started)
    progress("starting the floor relay")
    add(targets, proxies, start_floor_relay(stack, dovecot, root / "proxies"))
    targets.sort(key=lambda t: TARGET_ORDER.index(t.key))
    bench = Bench(plan, dovecot, targets, proxies, loadgen, root / "proxies", progress)
    progress("warm-up")
    warm_up(bench)
    results = Results()
    if plan is QUICK:
        results.notes.append(
            "Quick run: fewer and shorter rounds; the memory workload stops at 1,000 sessions "
            "(the 10,000 point is skipped), so its goals are judged there."
        )
    if tuple(chosen) != WORKLOADS:
        results.notes.append(f"Only the workloads {', '.join(chosen)} were run (`--only`).")
    steps = {
        "page": pages,
        "tls": tls_pages,
        "options": options,
        "workers": workers,
        "bulk": bulk,
        "noop": noop,
        "memory": lambda b, r: memory(b, stack, r),
    }
    for name in WORKLOADS:
        if name in chosen:
            steps[name](bench, results)
    return results


def add(
    targets: list[Target],
    proxies: dict[str, subprocess.Popen[bytes]],
    started: tuple[Target, subprocess.Popen[bytes]],
) -> None:
    target, process = started
    targets.append(target)
    proxies[target.key] = process


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = QUICK if args.quick else DEFAULT
    chosen = tuple(w for w in WORKLOADS if w in (args.only or WORKLOADS))
    check_prerequisites()
    stop_on_sigterm()
    progress = Progress()
    root = Path(tempfile.mkdtemp(prefix="imapproxy-bench-"))
    os.chmod(root, 0o755)  # Dovecot's mail user must traverse it
    try:
        with contextlib.ExitStack() as stack:
            results = run_all(plan, root, stack, progress, chosen)
            progress("stopping")
    except KeyboardInterrupt:
        progress("interrupted: everything started was stopped")
        return 130
    finally:
        if args.keep:
            progress(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    date = datetime.date.today().isoformat()
    elapsed_s = progress.elapsed_s()
    only = chosen != WORKLOADS
    command = "python -m bench.run" + (" --quick" if args.quick else "")
    command += f" --only {' '.join(chosen)}" if only else ""
    text = report.render(results, plan, date, elapsed_s, command)
    name = date if plan is DEFAULT else f"{date}-{plan.name}"
    name += f"-only-{'-'.join(chosen)}" if only else ""
    path = report.write_results(RESULTS_DIR, name, text)
    block = report.summary(results, plan, date, elapsed_s, command)
    print(block)
    progress(f"report written to {path.relative_to(REPO)}")
    publishing = plan is DEFAULT and not only and not args.no_publish
    if publishing and report.publish(BENCHMARKS_MD, block):
        progress(f"summary published in {BENCHMARKS_MD.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

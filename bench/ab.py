"""``python -m bench.ab REV [--rounds N] [--window S]``: this tree against an older revision,
in one run.

The revision is taken out with ``git archive`` into a temporary directory; both are started
twice (SELECT cache off and on) in front of one private Dovecot and measured in alternating
rounds at c=1 with the quickack client: page p50, pages/s, proxy CPU (user + system) per page,
and backend waits per page where the revision counts them (``BackendWaits``). For a change's
own cost or gain, where the full ``bench.run`` compares products.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import targets
from bench.mailstore import PASSWORD, BenchDovecot, seed_all, webmail_users
from bench.pages import PAGE_FETCH
from bench.procstat import process_cpu_s
from bench.wire import Connection
from imapproxy import stats

USERS = 50


@dataclass
class Tally:
    latencies_s: list[float] = field(default_factory=list)
    pages: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    waits: int = 0


@dataclass(frozen=True)
class Measured:
    target: targets.Target
    pid: int
    stat_path: Path


def archive(revision: str, into: Path) -> None:
    """The revision's files, as git has them, in ``into`` (readable by the proxy's user)."""
    tar = subprocess.run(
        ["git", "-C", str(targets.REPO), "archive", revision], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=tar, check=True)
    if (into / "imapproxy" / "protocol" / "_scan.c").exists():  # its C scanner, as pip builds it
        subprocess.run(
            [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
            cwd=into,
            check=True,
            capture_output=True,
        )
    subprocess.run(["chmod", "-R", "a+rX", str(into)], check=True)


def page(target: targets.Target, user: str) -> None:
    connection = Connection.open(target.host, target.port, quickack=True, timeout_s=5)
    try:
        connection.login(user, PASSWORD)
        connection.command(b"SELECT INBOX", "SELECT")
        connection.command(PAGE_FETCH, "FETCH")
        connection.logout()
    finally:
        connection.close()


def start(
    stack: contextlib.ExitStack, dovecot: BenchDovecot, repo: Path, root: Path, cache: bool
) -> Measured:
    """A proxy run from ``repo`` (``bench.targets`` starts it with that as its directory)."""
    home, targets.REPO = targets.REPO, repo
    try:
        target, process = targets.start_proxy(stack, "imapproxy", dovecot, root, select_cache=cache)
    finally:
        targets.REPO = home
    return Measured(target, process.pid, next(root.glob("*/pimpstats")))


def window(measured: Measured, users: list[str], seconds: float, tally: Tally) -> None:
    cpu, waits = process_cpu_s(measured.pid), _waits(measured)
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        begun = time.perf_counter()
        page(measured.target, users[tally.pages % len(users)])
        tally.latencies_s.append(time.perf_counter() - begun)
        tally.pages += 1
    tally.wall_s += time.monotonic() - started
    tally.cpu_s += process_cpu_s(measured.pid) - cpu
    tally.waits += _waits(measured) - waits


def _waits(measured: Measured) -> int:
    counters = stats.read_file(str(measured.stat_path))
    return counters.BackendWaits if counters is not None else 0


def run(revision: str, rounds: int, window_s: float) -> dict[tuple[str, bool], Tally]:
    root = Path(tempfile.mkdtemp(prefix="imapproxy-ab-"))
    os.chmod(root, 0o755)
    old = root / "old"
    old.mkdir()
    archive(revision, old)
    with contextlib.ExitStack() as stack:
        dovecot = BenchDovecot(root / "dovecot", fast=True, client_limit=2000)
        seed_all(dovecot, USERS, 0)
        targets.start_dovecot(stack, dovecot)
        users = webmail_users(USERS)
        proxies = {
            (name, cache): start(stack, dovecot, repo, root / f"{name}-{cache}", cache)
            for name, repo in ((revision, old), ("this tree", targets.REPO))
            for cache in (False, True)
        }
        for measured in proxies.values():  # warm: Dovecot's caches, then one cached session each
            for user in users * 2:
                page(measured.target, user)
        tallies = {key: Tally() for key in proxies}
        for _ in range(rounds):
            for key, measured in proxies.items():
                window(measured, users, window_s, tallies[key])
    subprocess.run(["rm", "-rf", str(root)], check=False)
    return tallies


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    parser.add_argument("revision", help="the older revision, e.g. a commit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=float, default=4.0, help="seconds per round and target")
    args = parser.parse_args(argv)
    print("| code | SELECT cache | p50 ms | pages/s | proxy CPU ms/page | waits/page |")
    print("|---|---|---|---|---|---|")
    for (name, cache), tally in run(args.revision, args.rounds, args.window).items():
        print(
            f"| {name} | {'on' if cache else 'off'} "
            f"| {statistics.median(tally.latencies_s) * 1000:.3f} "
            f"| {tally.pages / tally.wall_s:.0f} | {tally.cpu_s * 1000 / tally.pages:.3f} "
            f"| {tally.waits / tally.pages:.2f} |"
        )


if __name__ == "__main__":
    main()

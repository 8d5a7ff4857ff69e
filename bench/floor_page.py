"""The floor of a gevent page proxy: the least CPU per webmail page any proxy on gevent can spend.

``python -m bench.floor_page serve --listen PORT --backend HOST:PORT [--select-cache]
[--check-and-log]`` runs the floor page proxy; ``python -m bench.floor_page [--rounds N]
[--window S] [--concurrency 1 8] [--users N]`` measures it against imapproxy and
up-imapproxy in one run (``measure``); ``python -m bench.floor_page syscalls`` counts the
system calls per page of all eight targets.

The floor page proxy does what a connection-caching proxy must do for the benchmark's page
(LOGIN, SELECT INBOX, the header FETCH, LOGOUT) and nothing else, in the style of
``bench.floor_relay``: connections accepted on 127.0.0.1 and served on kept greenlets as
imapproxy serves them (``imapproxy.accept``; the listener's ``TCP_NODELAY`` inherited); per
client a canned greeting; the ``LOGIN`` line read whole; a backend session already logged in for
exactly those LOGIN arguments (user and password as the client quoted them) taken from a
per-login pool, with no liveness check, and answered ``* OK [XPROXYREUSE] ...`` and
``<tag> OK`` in one write; only the first time it connects to the backend and logs in for
real (answered ``<tag> OK`` alone). Then floor_relay's loop: command to the backend, reads
forwarded until one ends with a line that starts with the client's tag. ``LOGOUT`` it answers
itself (``* BYE``, ``<tag> OK``) after giving the session back to the pool; a client that goes
away otherwise, or any socket error, closes the session instead.

With ``--select-cache`` the first ``SELECT INBOX`` reply of each backend session is forwarded
and kept; every later ``SELECT INBOX`` on that session is answered from the kept bytes,
re-tagged, without the backend. That is not exact (a new message or a flag changed elsewhere
would not show): it is a floor, up-imapproxy's cache without even its checks, not a design.

With ``--check-and-log`` it adds the least that a proxy fit to run must do on top, as
imapproxy does it: a liveness check of each reused session (``NOOP``, sent after the client's
answer and read before the client's first command goes to the backend; a session that fails
it is closed and the client with it), and a log line on stderr per login and per logout (the
LOGIN line with the user and the client's address, as up-imapproxy writes them).

No parsing beyond the tag and those two commands, no statistics, time-outs or limits.
Correct only for a client that waits for each reply before its next command and sends no
literal (the benchmark's page): a LOGIN with a literal, pipelining or IDLE would break it. A
first line that is not a LOGIN gets ``* BAD`` and a failed backend LOGIN ``NO``, and the
client is closed.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import gevent
from gevent import socket

from bench import syscalls
from bench.figures import Summary, summarize
from bench.floor_relay import CLIENT_RECV_BYTES, LISTEN_HOST, READ_BYTES, reply_state, send_all
from bench.loadgen import LoadGenerator
from bench.mailstore import BenchDovecot, seed_all, webmail_users
from bench.plan import DEFAULT, WEBMAIL_USERS, Plan
from bench.run import DOVECOT_CLIENT_LIMIT, Progress
from bench.targets import (
    REPO,
    Target,
    direct_targets,
    start_dovecot,
    start_process,
    start_proxy,
    wait_listening,
)
from bench.workloads import (
    JOB_MARGIN_S,
    Bench,
    Case,
    Results,
    page_job,
    prepare,
    rotated_rounds,
    warm_up,
)
from imapproxy.accept import ClientGreenlets, ClientListener
from tests.support.dovecot import free_port

GREETING = b"* OK [CAPABILITY IMAP4rev1] floor page proxy ready\r\n"
REUSED = b"* OK [XPROXYREUSE] a logged-in backend session reused\r\n"
LOGGED_IN = b"OK Logged in\r\n"
LOGOUT_REPLY = b"* BYE Logging out\r\n"
LOGOUT_DONE = b"OK Logout completed\r\n"
AUTH_FAILED = b"NO [AUTHENTICATIONFAILED] Authentication failed\r\n"
UNAVAILABLE = b"NO [UNAVAILABLE] Backend unavailable\r\n"
NOT_LOGIN = b"BAD LOGIN first\r\n"
LOGOUT = b"LOGOUT\r\n"  # the command after the tag, exactly as the benchmark sends it
SELECT_INBOX = b"SELECT INBOX\r\n"
BACKEND_TAG = b"L "  # of the floor's own LOGIN to the backend
GREETING_TAG = b"* "  # a backend greeting is one untagged line: it "ends" like a reply
MAX_LOGIN_BYTES = 8192  # a LOGIN line longer than this is refused (a bound on the read loop)
CHECK_TAG = b"C "  # of the liveness check (``--check-and-log``)
CHECK = CHECK_TAG + b"NOOP\r\n"

Handler = Callable[[socket.socket, tuple[str, int]], None]


def login_arguments(line: bytes) -> tuple[bytes, bytes] | None:
    """``(tag, arguments)`` of a whole ``<tag> LOGIN <arguments>\\r\\n`` line, else None.

    The arguments (RFC 9051 §6.2.3: userid and password, here quoted strings) are kept as
    the client wrote them: they are the pool's key and go to the backend as they are.
    """
    tag, _, rest = line.partition(b" ")
    command, _, arguments = rest.partition(b" ")
    if not tag or command.upper() != b"LOGIN" or not arguments.endswith(b"\r\n"):
        return None
    arguments = arguments[:-2]
    return (tag, arguments) if arguments else None


def split_completion(reply: bytes, tag: bytes) -> tuple[bytes, bytes] | None:
    """A whole reply to ``tag`` (``b"s1 "``) as (its untagged lines, its tagged line after the
    tag), so that ``untagged + other_tag + completion`` is the same reply to another tag."""
    if not reply.endswith(b"\n"):
        return None
    start = reply.rfind(b"\n", 0, len(reply) - 1) + 1
    if not reply.startswith(tag, start):
        return None
    return reply[:start], reply[start + len(tag) :]


class BackendSession:
    """A logged-in backend connection, its read buffer (allocated once: a fresh 256 KiB one
    per page would cost page faults) and, with the SELECT cache, its kept SELECT reply."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.buffer = bytearray(READ_BYTES)
        self.view = memoryview(self.buffer)
        self.select_reply: tuple[bytes, bytes] | None = None
        self.checking = False  # a liveness check sent, its reply not read yet

    def read_reply(self, tag: bytes, forward: socket.socket | None = None) -> bytes | None:
        """Read until a read ends the reply to ``tag``; each read sent on to ``forward`` if
        given, else the whole reply returned. None when the backend closed."""
        kept = bytearray()
        done, head = False, b""
        while not done:
            count = self.sock.recv_into(self.buffer)
            if not count:
                return None
            if forward is None:
                kept += self.view[:count]
            else:
                send_all(forward, self.view[:count])
            done, head = reply_state(self.buffer, count, tag, head)
        return bytes(kept)

    def close(self) -> None:
        self.sock.close()


@dataclass
class Pool:
    """Idle backend sessions by LOGIN arguments, and where new ones come from."""

    backend_address: tuple[str, int]
    select_cache: bool = False
    check_and_log: bool = False
    idle: dict[bytes, list[BackendSession]] = field(default_factory=dict)

    def take(self, arguments: bytes) -> BackendSession | None:
        sessions = self.idle.get(arguments)
        return sessions.pop() if sessions else None

    def give_back(self, arguments: bytes, session: BackendSession) -> None:
        self.idle.setdefault(arguments, []).append(session)

    def log_in(self, arguments: bytes) -> BackendSession | None:
        """A new backend session logged in with ``arguments``; None if LOGIN failed.

        Raises ``OSError`` when the backend cannot be reached or closes.
        """
        sock = socket.create_connection(self.backend_address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = BackendSession(sock)
        try:
            if session.read_reply(GREETING_TAG) is not None:
                send_all(sock, BACKEND_TAG + b"LOGIN " + arguments + b"\r\n")
                reply = session.read_reply(BACKEND_TAG)
                if reply is not None and split_completion(reply, BACKEND_TAG + b"OK"):
                    return session
        except OSError:
            session.close()
            raise
        session.close()
        return None


def read_line(client: socket.socket) -> bytes:
    """The client's first line, whole (empty if it closed or sent too much without one)."""
    line = client.recv(CLIENT_RECV_BYTES)
    while line and not line.endswith(b"\n") and len(line) < MAX_LOGIN_BYTES:
        more = client.recv(CLIENT_RECV_BYTES)
        if not more:
            return b""
        line += more
    return line if line.endswith(b"\n") else b""


class Log:
    """Log lines on stderr, the time's text made once a second (as imapproxy's log does)."""

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""
        self.pid = os.getpid()

    def line(self, text: str) -> None:
        now = int(time.time())
        if now != self.second:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
            self.second, self.prefix = now, f"{stamp} floor[{self.pid}]: "
        sys.stderr.write(self.prefix + text + "\n")
        sys.stderr.flush()


LOG = Log()


def checked(session: BackendSession) -> bool:
    """The liveness check's reply read, if one is out: False if the session failed it."""
    if not session.checking:
        return True
    session.checking = False
    reply = session.read_reply(CHECK_TAG)
    return reply is not None and split_completion(reply, CHECK_TAG + b"OK") is not None


def relay(client: socket.socket, session: BackendSession, select_cache: bool) -> bytes | None:
    """floor_relay's loop on a logged-in session; the tag of the client's LOGOUT, or None when
    the client or the backend closed first (or the session failed its check)."""
    while True:
        request = client.recv(CLIENT_RECV_BYTES)
        if not request or not checked(session):
            return None
        tag = request[: request.find(b" ") + 1]  # b"b12 " (no space: any line ends the reply)
        command = request[len(tag) :]
        if command == LOGOUT:
            return tag
        if select_cache and command == SELECT_INBOX:
            if not select(client, session, request, tag):
                return None
            continue
        send_all(session.sock, request)
        if session.read_reply(tag, forward=client) is None:
            return None


def select(client: socket.socket, session: BackendSession, request: bytes, tag: bytes) -> bool:
    """``SELECT INBOX`` with the SELECT cache: the kept reply re-tagged, or the backend's,
    forwarded and kept. False when the backend closed."""
    if session.select_reply is not None:
        untagged, completion = session.select_reply
        send_all(client, untagged + tag + completion)
        return True
    send_all(session.sock, request)
    reply = session.read_reply(tag)
    if reply is None:
        return False
    send_all(client, reply)
    session.select_reply = split_completion(reply, tag)
    return True


def serve(pool: Pool) -> Handler:
    """The per-client handler: greeting, LOGIN from the pool (or for real), relay, LOGOUT."""

    def handle(client: socket.socket, address: tuple[str, int]) -> None:
        with contextlib.suppress(OSError):  # a reset from either side: both just close
            send_all(client, GREETING)
            login = login_arguments(read_line(client))
            if login is None:
                send_all(client, b"* " + NOT_LOGIN)
                return
            session = checked_out(client, pool, *login)
            if session is None:
                return
            if pool.check_and_log:
                user = login[1].split(b" ", 1)[0].strip(b'"').decode("utf-8", "replace")
                LOG.line(f"LOGIN: {user} ({address[0]}:{address[1]}) on sd [{session.fd}]")
            try:
                tag = relay(client, session, pool.select_cache)
            except OSError:
                session.close()
                raise
            if tag is None:
                session.close()
                return
            pool.give_back(login[1], session)
            send_all(client, LOGOUT_REPLY + tag + LOGOUT_DONE)
            if pool.check_and_log:
                LOG.line(f"LOGOUT: {user} from server sd [{session.fd}]")

    return handle


def checked_out(
    client: socket.socket, pool: Pool, tag: bytes, arguments: bytes
) -> BackendSession | None:
    """A session for the client's LOGIN, the client answered; None after a NO."""
    session = pool.take(arguments)
    reply = REUSED + tag + b" " + LOGGED_IN
    if session is None:
        try:
            session = pool.log_in(arguments)
        except OSError:
            send_all(client, tag + b" " + UNAVAILABLE)
            return None
        if session is None:
            send_all(client, tag + b" " + AUTH_FAILED)
            return None
        reply = tag + b" " + LOGGED_IN
    try:
        send_all(client, reply)
    except OSError:
        pool.give_back(arguments, session)  # still clean: the client went first
        raise
    if pool.check_and_log and reply.startswith(REUSED):  # after the answer, as imapproxy
        send_all(session.sock, CHECK)
        session.checking = True
    return session


def serve_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor_page serve", description=__doc__)
    parser.add_argument("--listen", type=int, required=True, metavar="PORT")
    parser.add_argument("--backend", required=True, metavar="HOST:PORT")
    parser.add_argument("--select-cache", action="store_true", help="answer repeated SELECTs")
    parser.add_argument(
        "--check-and-log", action="store_true", help="check reused sessions, log logins"
    )
    args = parser.parse_args(argv)
    host, _, port = args.backend.rpartition(":")
    pool = Pool((host, int(port)), select_cache=args.select_cache, check_and_log=args.check_and_log)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # Linux: every client's
    listener.bind((LISTEN_HOST, args.listen))
    listener.listen(1024)
    ClientListener(listener, serve(pool), ClientGreenlets()).start()
    gevent.wait()  # until SIGTERM, whose default action ends the process


# -- the measurement ----------------------------------------------------------------------------
#
# One private Dovecot with the benchmark's users (``bench.run``'s 200 by default), the load
# generator of ``bench.run`` (two processes, the ``webmail`` script: each thread draws its
# users at random from all of them) with the quickack client, and eight targets: the floor page
# proxy alone and with ``--check-and-log``, imapproxy and up-imapproxy, each SELECT cache off
# and on. ``bench.ab``'s in-process
# page loop is one client only; the load generator gives c=8 and the same page as the
# benchmark's own figures. Each target is warmed as ``bench.run`` warms (``warm_up``: two
# pages per user direct, which record each user's header bytes that every later page must
# match, then one page per user through each target) and then prepared as the options are
# (``prepare``: two cached sessions per user and an unmeasured second at the largest
# concurrency), so that no measured window pays for Dovecot logins. The rounds of a case
# rotate the targets (``rotated_rounds``), and each round is accounted as in ``bench.run``
# (``Bench.measure``: the proxy's user and system CPU from ``/proc``). Each of Dovecot's imap
# processes serves one session, and the eight targets keep two or more per user: Dovecot gets
# ``bench.run``'s limits (2,000 would stop logins at the fourth target's pairs).

TARGET_ORDER = (
    "limit",
    "floor-off",
    "floor-on",
    "chk-off",
    "chk-on",
    "ipx-off",
    "ipx-on",
    "up-off",
    "up-on",
)
PRODUCTS = {
    "limit": "limit (a client that stays logged in)",
    "floor": "floor page",
    "chk": "floor page + check and log",
    "ipx": "imapproxy",
    "up": "up-imapproxy",
}
DEFAULT_ROUNDS = 4
DEFAULT_WINDOW_S = 3.0
DEFAULT_CONCURRENCIES = (1, 8)
LOADGEN_WORKERS = 2  # as bench.run: the machine has 2 cores


def start_floor_page(
    stack: contextlib.ExitStack,
    dovecot: BenchDovecot,
    workdir: Path,
    select_cache: bool,
    check_and_log: bool = False,
) -> tuple[Target, subprocess.Popen[bytes]]:
    """The floor page proxy in front of ``dovecot`` (key ``floor-off`` or ``floor-on``; with
    ``check_and_log``, ``chk-off`` or ``chk-on``)."""
    key = f"{'chk' if check_and_log else 'floor'}-{'on' if select_cache else 'off'}"
    port = free_port()
    directory = workdir / f"{key}-{port}"
    directory.mkdir(parents=True)
    backend = f"{dovecot.host}:{dovecot.port}"
    argv = [sys.executable, "-m", "bench.floor_page", "serve", "--listen", str(port)]
    argv += ["--backend", backend] + (["--select-cache"] if select_cache else [])
    argv += ["--check-and-log"] if check_and_log else []
    process = start_process(stack, argv, directory / "output.log")
    wait_listening(process, port, "floor page", directory / "output.log")
    product = PRODUCTS[key.split("-")[0]]
    return Target(key, product, "127.0.0.1", port, process.pid, select_cache), process


def start_targets(
    stack: contextlib.ExitStack, dovecot: BenchDovecot, workdir: Path
) -> list[tuple[Target, subprocess.Popen[bytes]]]:
    """The eight targets, in ``TARGET_ORDER``."""
    started = [
        start_floor_page(stack, dovecot, workdir, cache, checked)
        for checked in (False, True)
        for cache in (False, True)
    ]
    for product in ("imapproxy", "up-imapproxy"):
        for cache in (False, True):
            started.append(start_proxy(stack, product, dovecot, workdir, select_cache=cache))
    return sorted(started, key=lambda pair: TARGET_ORDER.index(pair[0].key))


def measure(plan: Plan, progress: Callable[[str], None]) -> dict[tuple[int, str], Summary]:
    """Every target at every concurrency of ``plan``: (concurrency, key) -> its summary."""
    root = Path(tempfile.mkdtemp(prefix="imapproxy-floorpage-"))
    os.chmod(root, 0o755)  # Dovecot's mail user and nobody must get in
    try:
        with contextlib.ExitStack() as stack:
            progress(f"seeding Dovecot in {root}")
            dovecot = BenchDovecot(root / "dovecot", fast=True, client_limit=DOVECOT_CLIENT_LIMIT)
            seed_all(dovecot, plan.users, 0)
            start_dovecot(stack, dovecot)
            loadgen = LoadGenerator(LOADGEN_WORKERS)
            stack.callback(loadgen.close)
            progress("starting the floor page proxies, imapproxy and up-imapproxy")
            started = start_targets(stack, dovecot, root / "proxies")
            direct, limit = direct_targets(dovecot)
            measured = [limit] + [target for target, _ in started]
            processes = {target.key: process for target, process in started}
            bench = Bench(
                plan,
                dovecot,
                [direct, *measured],
                processes,
                loadgen,
                root / "proxies",
                progress,
            )
            progress("warm-up")
            warm_up(bench)
            for target in measured[1:]:
                prepare(bench, target, "quickack")
            results = Results()
            for concurrency in plan.concurrencies:
                case = Case("page", "quickack", concurrency)
                progress(case.label)
                # the limit's sessions, one per user, logged in by a window of 0 s (page_case)
                bench.loadgen.run(
                    page_job(bench, limit, "quickack", concurrency, 0.0), JOB_MARGIN_S
                )
                rotated_rounds(bench, results, case, measured)
            progress("stopping")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        (case.concurrency, key): summarize(rounds)
        for case, by_key in results.rounds.items()
        for key, rounds in by_key.items()
    }


def cpu_ms(summary: Summary) -> tuple[float, float, float]:
    """(user, system, total) proxy CPU ms per page; NaN when below the resolution."""
    total, system = summary.proxy_cpu_s_per_unit, summary.proxy_system_s_per_unit
    if total is None or system is None:
        return math.nan, math.nan, math.nan
    return (total - system) * 1000, system * 1000, total * 1000


def ratio(summaries: dict[tuple[int, str], Summary], concurrency: int, key: str, to: str) -> str:
    """``key``'s CPU per page over that of product ``to`` with the same SELECT cache."""
    if key == "limit":
        return "—"
    other = summaries.get((concurrency, f"{to}-{key.rsplit('-', 1)[1]}"))
    if other is None or key.startswith(f"{to}-"):
        return "—"
    mine, theirs = cpu_ms(summaries[(concurrency, key)])[2], cpu_ms(other)[2]
    return f"{mine / theirs:.2f}x" if theirs > 0 else "—"


def table(summaries: dict[tuple[int, str], Summary]) -> str:
    """The Markdown table: a row per concurrency and target."""
    lines = [
        "| c | target | SELECT cache | pages/s | p50 ms | p50 ÷ limit | proxy CPU ms/page user "
        "| system | total | ÷ up-imapproxy | ÷ floor | ÷ floor + check and log | errors "
        "| Dovecot logins/page |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (concurrency, key), summary in sorted(
        summaries.items(), key=lambda item: (item[0][0], TARGET_ORDER.index(item[0][1]))
    ):
        product, cache = key.rsplit("-", 1) if key != "limit" else (key, "—")
        user, system, total = cpu_ms(summary)
        limit = summaries.get((concurrency, "limit"))
        to_limit = f"{summary.p50_s / limit.p50_s:.2f}x" if limit and limit.p50_s else "—"
        lines.append(
            f"| {concurrency} | {PRODUCTS[product]} | {cache} | {summary.rate:.0f} "
            f"| {summary.p50_s * 1000:.2f} | {to_limit} | {user:.3f} | {system:.3f} | {total:.3f} "
            f"| {ratio(summaries, concurrency, key, 'up')} "
            f"| {ratio(summaries, concurrency, key, 'floor')} "
            f"| {ratio(summaries, concurrency, key, 'chk')} | {summary.error_count} "
            f"| {summary.backend_logins_per_unit or 0:.3f} |"
        )
    return "\n".join(lines)


def revision() -> str:
    described = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    return described.stdout.strip() or "unknown"


def measure_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor_page", description=__doc__)
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument(
        "--window", type=float, default=DEFAULT_WINDOW_S, help="seconds per round and target"
    )
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=list(DEFAULT_CONCURRENCIES), metavar="C"
    )
    parser.add_argument("--users", type=int, default=WEBMAIL_USERS)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("run as root: up-imapproxy starts as root to drop to nobody")
    plan = replace(
        DEFAULT,
        name="floor page",
        rounds=args.rounds,
        page_window_s=args.window,
        concurrencies=tuple(args.concurrency),
        users=args.users,
    )
    progress = Progress()
    summaries = measure(plan, progress)
    print(
        f"floor page run on {revision()}: {plan.rounds} rounds of {plan.page_window_s:g} s per "
        f"target, {plan.users} users, quickack client, {progress.elapsed_s():.0f} s in all\n"
    )
    print(table(summaries))


# -- system calls per page ---------------------------------------------------------------------
#
# ``python -m bench.floor_page syscalls [--pages N] [--users N]``: the eight targets traced as
# ``bench.syscalls`` traces the proxies (``strace -c -f`` attached during a fixed number of
# pages at c=1, quickack client, after one page per user; its table), so that the floor's
# calls per page stand beside imapproxy's and up-imapproxy's from the same run.


def traced_target(
    stack: contextlib.ExitStack, product: str, dovecot: BenchDovecot, workdir: Path, cache: bool
) -> Target:
    if product in (PRODUCTS["floor"], PRODUCTS["chk"]):
        return start_floor_page(stack, dovecot, workdir, cache, product == PRODUCTS["chk"])[0]
    return start_proxy(stack, product, dovecot, workdir, select_cache=cache)[0]


def syscalls_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor_page syscalls")
    parser.add_argument("--pages", type=int, default=syscalls.PAGES, help="pages per target")
    parser.add_argument("--users", type=int, default=syscalls.USERS, help="users (cycled)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("run as root: the proxies drop to nobody and strace attaches to them")
    root = Path(tempfile.mkdtemp(prefix="imapproxy-floorpage-syscalls-"))
    os.chmod(root, 0o755)
    try:
        with contextlib.ExitStack() as stack:
            dovecot = BenchDovecot(root / "dovecot", fast=True)
            seed_all(dovecot, args.users, 0)
            start_dovecot(stack, dovecot)
            loadgen = LoadGenerator(1)
            stack.callback(loadgen.close)
            names = webmail_users(args.users)
            direct = direct_targets(dovecot)[0]
            expected: dict[str, int] = {}
            for _ in range(2):  # Dovecot indexes the mailboxes; each user's header bytes noted
                job = syscalls.page_job(direct, names, {}, "warm")
                expected = loadgen.run(job, syscalls.JOB_TIMEOUT_S).tally.observed
            sequence = [names[i % len(names)] for i in range(args.pages)]
            found = []
            for key in TARGET_ORDER[1:]:  # the limit: no proxy to trace
                product, cache = PRODUCTS[key.rsplit("-", 1)[0]], key.endswith("-on")
                target = traced_target(stack, product, dovecot, root / "proxies", cache)
                syscalls.run_pages(loadgen, syscalls.page_job(target, names, expected, "warm"))
                job = syscalls.page_job(target, sequence, expected, "counted")
                label = f"{product}, SELECT cache {'on' if cache else 'off'}"
                found.append(syscalls.trace(loadgen, label, target, job, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"System calls per page on {revision()}: {args.pages} pages at c=1, quickack client\n")
    print(syscalls.render(found))


def main(argv: Sequence[str] | None = None) -> None:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["serve"]:
        serve_main(arguments[1:])
    elif arguments[:1] == ["syscalls"]:
        syscalls_main(arguments[1:])
    else:
        measure_main(arguments)


if __name__ == "__main__":
    main()

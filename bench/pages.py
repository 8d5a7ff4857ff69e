"""What one load-generator thread does, per script: the unit it times and how it prepares.

A script is a class with ``prepare()`` (untimed: logging in the sessions it keeps) and
``step()``, one timed unit (a page, a FETCH, a NOOP). The finite scripts (warm-up, memory)
take each of their users once and are then ``exhausted()``. ``step`` raises ``WireError`` on
failure; the thread counts it and goes on.

Scripts:
- ``webmail``: connect, LOGIN, SELECT INBOX, the 50-message header FETCH, LOGOUT, close,
  for a user drawn at random from the thread's users (all 200);
- ``limit``: SELECT INBOX and the same FETCH on a session kept logged in to Dovecot (a
  perfect cache), one session per user, the thread's users being its share of the 200;
- ``warm``: one webmail page per user of the thread, once; records each user's header bytes;
- ``noop``: NOOPs on one logged-in session;
- ``bulk``: ``UID FETCH <uid> BODY.PEEK[]`` of the user's messages in a size range;
- ``counted``: one webmail page per entry of the thread's users, in order (a fixed number of
  pages, for ``bench.syscalls``);
- ``cycle``: LOGIN and LOGOUT once per user (leaves a cached session in a proxy);
- ``pair``: two connections logged in as the same user at once, then both LOGOUT, once per
  user (leaves two cached sessions in a proxy: one for when two clients ask at once);
- ``hold``: LOGIN once per user and keep the connection open (``release`` closes them all).

A job with ``tls_ca_file`` speaks implicit TLS to its target, verified with that CA; one with
``proxy_source`` begins every connection with a PROXY v2 header naming that client address.
"""

from __future__ import annotations

import random
import ssl
import threading
from collections import Counter
from dataclasses import dataclass, field

from bench.wire import Connection, WireError

PAGE_FETCH = b"UID FETCH 1:50 (UID FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS (FROM SUBJECT DATE)])"
PAGE_MESSAGES = 50


@dataclass(frozen=True)
class Job:
    """A unit of work for the load generator, split by thread (``threads[i]``: its users)."""

    script: str
    host: str
    port: int
    quickack: bool
    threads: tuple[tuple[str, ...], ...]
    password: str
    duration_s: float = float("inf")
    timeout_s: float = 5.0
    seed: int = 0
    expected: tuple[tuple[str, int], ...] = ()  # user -> header bytes of their page FETCH
    thread_numbers: tuple[int, ...] = ()  # of ``threads`` in the whole job (set per worker)
    size_range: tuple[int, int] = (0, 1 << 40)  # bulk: message sizes to fetch
    tls_ca_file: str = ""  # implicit TLS to the target, its certificate from this CA
    proxy_source: str = ""  # a PROXY v2 header first, naming this client address


@dataclass
class Tally:
    """What a thread (then a worker, then a run) counted."""

    units: int = 0
    elapsed_s: float = 0.0
    busy_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    logins: int = 0
    reuses: int = 0
    bytes: int = 0
    observed: dict[str, int] = field(default_factory=dict)

    def add(self, other: Tally) -> None:
        self.units += other.units
        self.busy_s += other.busy_s
        self.latencies_s.extend(other.latencies_s)
        self.errors.update(other.errors)
        self.logins += other.logins
        self.reuses += other.reuses
        self.bytes += other.bytes
        self.observed.update(other.observed)


class WorkerState:
    """Connections a worker keeps between jobs: ``limit`` sessions and ``hold`` connections."""

    def __init__(self) -> None:
        self.sessions: dict[tuple[str, int, str], Connection] = {}
        self.held: list[Connection] = []
        self.lock = threading.Lock()
        self.tls_contexts: dict[str, ssl.SSLContext] = {}

    def tls_context(self, ca_file: str) -> ssl.SSLContext:
        """One client context per CA for the worker's life (as a PHP process keeps one)."""
        with self.lock:
            context = self.tls_contexts.get(ca_file)
            if context is None:
                context = ssl.create_default_context(cafile=ca_file)
                self.tls_contexts[ca_file] = context
            return context

    def close_all(self) -> None:
        for connection in [*self.sessions.values(), *self.held]:
            connection.close()
        self.sessions.clear()
        self.held.clear()


class Script:
    """The base: one thread's share of a job."""

    stop_on_error = False  # a script on one session cannot go on once that session failed

    def __init__(self, job: Job, index: int, state: WorkerState, tally: Tally):
        self.job, self.state, self.tally = job, state, tally
        self.users = job.threads[index]
        number = job.thread_numbers[index] if job.thread_numbers else index
        self.rng = random.Random(f"{job.seed}/{number}")  # each thread its own draws
        self.expected = dict(job.expected)
        self.next_user = 0

    def prepare(self) -> None:
        """Untimed set-up before the window opens."""

    def step(self) -> None:
        raise NotImplementedError

    def exhausted(self) -> bool:
        return False

    def finish(self) -> None:
        """Untimed clean-up after the window closes."""

    def logged_in(self, user: str) -> Connection:
        """Connect and LOGIN as ``user`` (counted); the connection is closed if LOGIN fails."""
        job = self.job
        tls = self.state.tls_context(job.tls_ca_file) if job.tls_ca_file else None
        connection = Connection.open(
            job.host,
            job.port,
            quickack=job.quickack,
            timeout_s=job.timeout_s,
            tls=tls,
            proxy_source=job.proxy_source,
        )
        try:
            reply = connection.login(user, job.password)
        except WireError:
            connection.close()
            raise
        self.tally.logins += 1
        self.tally.reuses += reply.reused
        return connection

    def page_fetch(self, connection: Connection, user: str) -> int:
        """SELECT INBOX and the header FETCH; checks the reply is this user's."""
        connection.command(b"SELECT INBOX", "SELECT")
        reply = connection.command(PAGE_FETCH, "FETCH")
        if reply.literals != PAGE_MESSAGES:
            raise WireError("short FETCH", f"{reply.literals} messages")
        wanted = self.expected.get(user)
        if wanted is not None and reply.literal_bytes != wanted:
            raise WireError("wrong data", f"{user}: {reply.literal_bytes} bytes, not {wanted}")
        self.tally.bytes += reply.literal_bytes
        return reply.literal_bytes

    def page(self, user: str) -> int:
        """A webmail page: connect, LOGIN, SELECT, FETCH, LOGOUT, close."""
        connection = self.logged_in(user)
        try:
            size = self.page_fetch(connection, user)
            connection.logout()
        finally:
            connection.close()
        return size


class FiniteScript(Script):
    """A script that takes each of its users once."""

    def take_user(self) -> str:
        self.next_user += 1
        return self.users[self.next_user - 1]

    def exhausted(self) -> bool:
        return self.next_user >= len(self.users)


class WebmailPage(Script):
    def step(self) -> None:
        self.page(self.rng.choice(self.users))


class WarmPage(FiniteScript):
    def step(self) -> None:
        user = self.take_user()
        self.tally.observed[user] = self.page(user)


class CountedPages(FiniteScript):
    def step(self) -> None:
        self.page(self.take_user())


class LimitPage(Script):
    def prepare(self) -> None:
        for user in self.users:
            self.session(user)

    def session(self, user: str) -> Connection:
        key = (self.job.host, self.job.port, user)
        connection = self.state.sessions.get(key)
        if connection is None:
            connection = self.state.sessions[key] = self.logged_in(user)
        return connection

    def step(self) -> None:
        user = self.rng.choice(self.users)
        connection = self.session(user)
        try:
            self.page_fetch(connection, user)
        except WireError:
            del self.state.sessions[(self.job.host, self.job.port, user)]
            connection.close()
            raise


class SessionScript(Script):
    """A script on one logged-in session of the thread's first user."""

    connection: Connection | None = None
    stop_on_error = True

    def prepare(self) -> None:
        self.connection = self.logged_in(self.users[0])

    def finish(self) -> None:
        if self.connection is not None:
            self.connection.close()


class Noop(SessionScript):
    def step(self) -> None:
        assert self.connection is not None
        self.connection.command(b"NOOP", "NOOP")


class BulkFetch(SessionScript):
    uids: list[bytes]

    def prepare(self) -> None:
        super().prepare()
        assert self.connection is not None
        self.connection.command(b"SELECT INBOX", "SELECT")
        low, high = self.job.size_range
        search = b"UID SEARCH LARGER %d SMALLER %d" % (low, high)
        self.uids = self.search(self.connection, search)
        if not self.uids:
            raise WireError("no messages", search.decode())

    def search(self, connection: Connection, command: bytes) -> list[bytes]:
        connection.next_tag += 1
        tag = b"s%d" % connection.next_tag
        connection.sock.sendall(tag + b" " + command + b"\r\n")
        uids: list[bytes] = []
        while True:
            line = connection.read_line()
            if line.startswith(b"* SEARCH"):
                uids = line.split()[2:]
            elif line.startswith(tag + b" "):
                return uids

    def step(self) -> None:
        assert self.connection is not None
        uid = self.uids[self.tally.units % len(self.uids)]
        reply = self.connection.command(b"UID FETCH " + uid + b" BODY.PEEK[]", "FETCH")
        self.tally.bytes += reply.literal_bytes


class Cycle(FiniteScript):
    def step(self) -> None:
        connection = self.logged_in(self.take_user())
        try:
            connection.logout()
        finally:
            connection.close()


class Pair(FiniteScript):
    def step(self) -> None:
        user = self.take_user()
        first = self.logged_in(user)
        try:
            second = self.logged_in(user)  # while the first holds its session
            try:
                second.logout()
            finally:
                second.close()
            first.logout()
        finally:
            first.close()


class Hold(FiniteScript):
    def step(self) -> None:
        connection = self.logged_in(self.take_user())
        with self.state.lock:
            self.state.held.append(connection)


SCRIPTS: dict[str, type[Script]] = {
    "webmail": WebmailPage,
    "warm": WarmPage,
    "limit": LimitPage,
    "counted": CountedPages,
    "noop": Noop,
    "bulk": BulkFetch,
    "cycle": Cycle,
    "pair": Pair,
    "hold": Hold,
}

"""The hand-over on restart: a successor process takes the listeners and the cached sessions.

The gevent edge of ``session_transfer`` (the wire format and its order). The running proxy
listens on a Unix ``SOCK_SEQPACKET`` socket (``takeover_socket``, mode 0600, root's when the
proxy starts as root; created before the privilege drop). A successor (``in.imapproxyd
--take-over``, or started by the running proxy on SIGUSR2) connects; only root is served
(``SO_PEERCRED``), and the proxy's own uid when it never was root. The running proxy sends:

* its listening sockets (IMAP, implicit TLS, metrics, and this hand-over socket itself), as
  descriptors (``SCM_RIGHTS``): the kernel's accept queues stay open all along, so no
  connection is refused while the processes switch;
* the ``CredentialHasher`` key, which the cache's digests are keyed with;
* every cached session that can move, one message each with its backend socket: taken out of
  the cache first, brought to rest (what the server sent while it was cached is read; an
  UNSELECT still in flight is waited for behind a NOOP). A session on TLS to the server stays
  behind: its keys live in this process; it is logged out, and the log says so.

The successor adopts the sessions (``Proxy.adopt``: one call per session, so that a successor
with several workers can route each to its owner), starts accepting, and says READY; only then
does the old process close its listeners (its copies), and go on as on SIGTERM: its active
clients get ``shutdown_timeout``, and the sessions they check in meanwhile are shipped too
(``Handover.ship``). Then END, and it exits 0.

Until READY nothing is lost: when a successor dies (its connection closed by every process of
it) the sessions sent go back into the old process's cache (the sockets were only copied), and
the old process serves on. A successor that is still there but says nothing in time may have
adopted them: then the old process drops its copies rather than share a session with it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import gevent
from gevent import socket, ssl
from gevent.event import Event

from imapproxy import session_transfer
from imapproxy.backend import BackendSession, ServerTraits
from imapproxy.cache import Slot
from imapproxy.credentials import CredentialHasher
from imapproxy.errors import BackendFailure, BackendProtocolError, why
from imapproxy.route import Route
from imapproxy.session_transfer import (
    FORMAT_VERSION,
    MAX_MESSAGE_BYTES,
    HasherKey,
    Hello,
    Kind,
    Listener,
    ListenerRole,
    Listeners,
    Marker,
    Message,
    Phase,
    ReceiveOrder,
    Refused,
    SessionRecord,
    TransferError,
    VersionMismatch,
)

if TYPE_CHECKING:
    from imapproxy.server import Proxy

LOGGER = logging.getLogger("imapproxy")

TAKEOVER_SUFFIX = ".takeover"
HELLO_TIMEOUT_S = 10.0  # a successor that connects says HELLO at once
# The successor adopts every session and starts accepting between SENT and READY: an in-memory
# step of milliseconds per thousand sessions.
READY_TIMEOUT_S = 30.0
SETTLE_TIMEOUT_S = 5.0  # the NOOP behind an UNSELECT still in flight
# A session checked in after READY goes to the successor at once; a successor that reads
# nothing for this long (it died, and a process of it still holds the connection) gets no more.
SHIP_TIMEOUT_S = 10.0
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def socket_path(takeover_socket: str | None, pidfile: str | None, stat_filename: str) -> str:
    """Where the hand-over socket is: ``takeover_socket``, else beside the pid file, else
    beside the statistics file; "" when there is no such place (hand-over off)."""
    if takeover_socket is not None:
        return "" if takeover_socket.lower() == "none" else takeover_socket
    base = pidfile or stat_filename
    return base + TAKEOVER_SUFFIX if base else ""


def peer_allowed(peer_uid: int, own_uid: int, root_only: bool = False) -> bool:
    """Whether a successor may connect: root always; this process's user too unless
    ``root_only`` (the proxy started as root and dropped to ``proc_username``: its successor
    starts as root too, and the service user, often ``nobody``, may be shared with others)."""
    return peer_uid == 0 or (peer_uid == own_uid and not root_only)


def peer_uid(sock: socket.socket) -> int:
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    return int(_PEERCRED.unpack(data)[1])


# -- the channel ------------------------------------------------------------------------------


class PeerClosed(TransferError):
    """The other end of the hand-over connection is closed: no process of the successor has it
    open any more (each of its workers holds a copy until it exits)."""


def peer_gone(error: Exception) -> bool:
    """Whether a failed hand-over means that no process of the successor is left to use what
    it was sent (it closed the connection), as against one that may still (a time limit)."""
    return isinstance(error, (PeerClosed, BrokenPipeError, ConnectionResetError))


class Channel:
    """One hand-over connection: whole messages, each with its descriptors."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, message: Message, fds: list[int] | None = None) -> None:
        self.send_encoded(session_transfer.encode(message), fds)

    def send_encoded(self, data: bytes, fds: list[int] | None = None) -> None:
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.sendall(data)

    def receive(self, timeout: float | None) -> tuple[Message, list[int]]:
        """The next message and its descriptors (received close-on-exec)."""
        with gevent.Timeout(timeout, TransferError(f"nothing came within {timeout} s")):
            data, fds, flags, _ = socket.recv_fds(
                self.sock, MAX_MESSAGE_BYTES, 16, socket.MSG_CMSG_CLOEXEC
            )
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            _close_fds(fds)
            raise TransferError("message or its descriptors cut short")
        if not data:
            raise PeerClosed("the other process closed the connection")
        try:
            return session_transfer.decode(data), fds
        except TransferError:
            _close_fds(fds)
            raise

    def close(self) -> None:
        self.sock.close()


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _one_fd(fds: list[int], what: str) -> int:
    if len(fds) != 1:
        _close_fds(fds)
        raise TransferError(f"{what} came with {len(fds)} descriptors")
    return fds[0]


# -- the running proxy's side -----------------------------------------------------------------


def bind(path: str) -> socket.socket:
    """The hand-over socket (as root, before the drop): mode 0600, owned by whoever creates
    it (root, when the proxy starts as root: only root may connect then).

    A socket file left by a proxy that is gone is replaced; anything else at the path is not.
    """
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        old_mask = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old_mask)
        sock.listen(4)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass
class Served:
    """The sockets the running proxy hands over, by role."""

    listeners: list[tuple[ListenerRole, socket.socket]]

    def describe(self) -> tuple[Listeners, list[int]]:
        items, fds = [], []
        for role, sock in self.listeners:
            name = sock.getsockname()
            host, port = (name, 0) if isinstance(name, str) else (str(name[0]), int(name[1]))
            items.append(Listener(role, sock.family, host, port))
            fds.append(sock.fileno())
        return Listeners(tuple(items)), fds


@dataclass
class _Kept:
    """A session sent before READY: kept (its socket copied) until the successor is serving."""

    username: bytes
    digest: bytes
    route: object
    cached_at: float
    session: BackendSession

    def encoded(self, remaining_s: float) -> bytes:
        """The SESSION message (``ValueError`` if it does not fit one)."""
        session = self.session
        host, port = str(session.address[0]), int(session.address[1])
        route = self.route if isinstance(self.route, Route) else None
        return session_transfer.encode(
            SessionRecord(
                username=self.username,
                digest=self.digest,
                route=route,
                login=session.login,
                select_entry=session.select_entry,
                selected=session.selected,
                closed_line=session.traits.closed_line,
                remaining_ms=max(0, int(remaining_s * 1000)),
                origin_ip=session.origin_ip,
                server=session.server,
                backend_host=host,
                backend_port=port,
            )
        )


class Handover:
    """The running proxy's end: serves successors on the hand-over socket, one at a time."""

    def __init__(
        self, proxy: Proxy, sock: socket.socket, served: Served, root_only: bool = False
    ) -> None:
        self.proxy, self.sock, self.served = proxy, sock, served
        self.root_only = root_only  # ``peer_allowed``
        self.done = Event()  # set when a successor is serving: stop as on SIGTERM
        self.successor_pid = 0
        self._channel: Channel | None = None  # the successor's, after READY
        self._busy = False
        self._sent_late = 0
        self._sent = 0
        self._accepting: gevent.Greenlet | None = None

    @property
    def _who(self) -> str:
        return "root" if self.root_only else f"root and uid {os.getuid()}"

    @property
    def busy(self) -> bool:
        """A successor is connected and the hand-over under way (or done)."""
        return self._busy

    def start(self) -> None:
        self._accepting = gevent.spawn(self._accept_loop)

    def _accept_loop(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError as error:
                if self.done.is_set() or error.errno == errno.EBADF:
                    return
                LOGGER.warning("hand-over socket: %s", error)
                gevent.sleep(1)
                continue
            # one at a time: with workers, the next successor connection goes to a worker that
            # has not handed over yet (this one does not accept while it hands over)
            self._serve_one(conn)

    def _serve_one(self, conn: socket.socket) -> None:
        uid = peer_uid(conn)
        if not peer_allowed(uid, os.getuid(), self.root_only):
            LOGGER.warning("hand-over: refused a connection from uid %d (only %s)", uid, self._who)
            conn.close()
            return
        if self._busy or self.done.is_set():
            _refuse(Channel(conn), "another hand-over is under way")
            return
        self._busy = True
        try:
            self._hand_over(Channel(conn))
        finally:
            self._busy = self.done.is_set()

    def _hand_over(self, channel: Channel) -> None:
        try:
            message, fds = channel.receive(HELLO_TIMEOUT_S)
        except VersionMismatch as error:
            LOGGER.error("hand-over: refused a successor: %s; still serving", error)
            _refuse(channel, str(error))
            return
        except TransferError as error:
            LOGGER.error("hand-over: no HELLO from the successor (%s); still serving", error)
            channel.close()
            return
        _close_fds(fds)
        if not isinstance(message, Hello):
            LOGGER.error("hand-over: the successor began with %s; still serving", message)
            _refuse(channel, "expected HELLO")
            return
        self.successor_pid = message.pid
        LOGGER.info("hand-over: successor pid %d connected", message.pid)
        self._sent = self._sent_late = 0  # this successor's (an earlier one may have failed)
        kept: list[_Kept] = []
        started = time.perf_counter()
        try:
            self._send_setup(channel)
            self._ship_cached(channel, kept)
            channel.send(Marker(Kind.SENT, len(kept)))
            ready, fds = channel.receive(READY_TIMEOUT_S)
            _close_fds(fds)
            if not (isinstance(ready, Marker) and ready.kind is Kind.READY):
                raise TransferError(f"expected READY, got {type(ready).__name__}")
        except (TransferError, OSError) as error:
            self._failed(message.pid, error, kept)
            channel.close()
            return
        self._ready(channel, kept, time.perf_counter() - started)

    def _failed(self, pid: int, error: Exception, kept: list[_Kept]) -> None:
        """The sessions sent come back into the cache only if no process of the successor can
        use them: one that is still there (it said nothing in time) may have adopted its
        copies, and a session used by two processes mixes their commands."""
        if not kept or peer_gone(error):
            self._take_back(kept)
            outcome = "taken back"
        else:
            for item in kept:  # without LOGOUT: the successor's copy may be serving
                item.session.close()
            outcome = "dropped (the successor may have adopted them)"
        LOGGER.error(
            "hand-over to pid %d failed (%s): the %d sessions sent %s; still serving",
            pid,
            why(error),
            len(kept),
            outcome,
        )

    def _send_setup(self, channel: Channel) -> None:
        workers = self.proxy.workers
        processes = workers.count if workers is not None else 1
        channel.send(Hello(FORMAT_VERSION, os.getpid(), processes))
        listeners, fds = self.served.describe()
        channel.send(listeners, fds)
        channel.send(HasherKey(self.proxy.hasher.key))

    def _ship_cached(self, channel: Channel, kept: list[_Kept]) -> None:
        """Send every cached session (oldest first); the ones sent go to ``kept`` (before
        they are sent: one whose send failed is kept too), until READY."""
        # bounded: under load clients check sessions in meanwhile; what is left goes after READY
        for _ in range(self.proxy.cache.size):
            item = self._take(self.proxy.cache.take_oldest())
            if item is None:
                break
            data = self._prepare(item)
            if data is not None:
                kept.append(item)
                self._send(channel, item, data)

    def _take(self, slot: Slot[BackendSession] | None) -> _Kept | None:
        """What the hand-over needs of a slot taken from the cache, the slot freed."""
        if slot is None or slot.session is None:
            return None
        item = _Kept(slot.username, slot.digest, slot.server, slot.cached_at, slot.session)
        self.proxy.cache.release(slot)
        self.proxy.sessions_changed()
        return item

    def _prepare(self, item: _Kept) -> bytes | None:
        """The session's message, or None if it cannot move: then it is logged out, and the
        log says why."""
        remaining = item.cached_at + self.proxy.config.cache_expiration_time - self.proxy.clock()
        reason = _unmovable(item.session)
        try:
            data = b"" if reason else item.encoded(remaining)
        except ValueError as error:
            reason = f"cannot be encoded ({error})"
        if not reason:
            return data
        session = item.session
        LOGGER.info(
            "hand-over: sd [%d] of '%s' %s: logged out, not moved",
            session.sd,
            _user(session),
            reason,
        )
        self.proxy.logout_later(session)
        return None

    def _send(self, channel: Channel, item: _Kept, data: bytes) -> None:
        channel.send_encoded(data, [item.session.sock.fileno()])
        self._sent += 1

    def _take_back(self, kept: list[_Kept]) -> None:
        """The successor failed before READY: the sessions go back in the cache."""
        for item in kept:
            if not self.proxy.cache.adopt(
                item.username, item.digest, item.session, item.route, item.cached_at
            ):
                self.proxy.logout_later(item.session)
        self.proxy.sessions_changed()

    def _ready(self, channel: Channel, kept: list[_Kept], took_s: float) -> None:
        for item in kept:  # the successor has its own copies now
            item.session.close()
        LOGGER.info(
            "hand-over: pid %d is serving with %d sessions from here (%d ms after HELLO); "
            "no longer accepting",
            self.successor_pid,
            len(kept),
            took_s * 1000,
        )
        self._channel = channel
        self.sock.close()
        self.proxy.ship = self.ship
        self.done.set()  # the caller stops as on SIGTERM: Proxy.stop ships what is cached

    def ship(self, slot: Slot[BackendSession], cached_at: float) -> bool:
        """A session after READY (checked in now, or still cached since ``cached_at``; the
        slot ACTIVE): to the successor if it can move (else logged out); False when the
        successor is gone (the caller logs it out)."""
        channel = self._channel
        if channel is None:
            return False
        item = self._take(slot)
        if item is not None:
            item.cached_at = cached_at
        data = self._prepare(item) if item is not None else None
        if item is None or data is None:
            return True
        try:
            with gevent.Timeout(SHIP_TIMEOUT_S, TransferError(f"not read for {SHIP_TIMEOUT_S} s")):
                self._send(channel, item, data)
        except (TransferError, OSError) as error:
            LOGGER.warning("hand-over: the successor is gone (%s): sessions logged out", why(error))
            self._channel = None
            channel.close()
            self.proxy.logout_later(item.session)
            return True
        self._sent_late += 1
        item.session.close()  # the successor's copy lives on
        return True

    def finish(self) -> None:
        """After the active clients: END, and the connection closed."""
        channel, self._channel = self._channel, None
        if channel is None:
            return
        with contextlib.suppress(OSError, TransferError):
            channel.send(Marker(Kind.END, self._sent))
        channel.close()
        LOGGER.info(
            "hand-over: done, %d sessions sent (%d checked in late)", self._sent, self._sent_late
        )

    def close(self, remove: bool = False) -> None:
        """Stop serving successors; ``remove``: the socket file too (a plain stop)."""
        if self._accepting is not None:
            self._accepting.kill(block=False)
        if remove:
            with contextlib.suppress(OSError, TypeError):
                name = self.sock.getsockname()
                os.unlink(name)
        self.sock.close()


def _refuse(channel: Channel, reason: str) -> None:
    with contextlib.suppress(OSError, TransferError):
        channel.send(Refused(reason))
    channel.close()


def _user(session: BackendSession) -> str:
    return session.username.decode("utf-8", "backslashreplace")


def _unmovable(session: BackendSession) -> str:
    """Why a session taken out of the cache cannot move ("" if it can), after bringing it to
    rest: what came while it was cached read, an UNSELECT in flight waited for."""
    if isinstance(session.sock, ssl.SSLSocket):
        return "is on TLS to the server (its keys live in this process)"
    if session.check is not None:
        return "has a liveness check in flight"
    try:
        session.read_waiting()
        if session.pending:  # its completion comes before the NOOP's (RFC 9051 §5.5)
            untagged, _ = session.command(b"NOOP", SETTLE_TIMEOUT_S)
            session.news += untagged
    except (BackendFailure, BackendProtocolError, OSError) as error:
        return f"is dead ({why(error)})"
    if session.reader.has_buffered():
        return "has unread data from the server"
    if session.news:  # what the reuse check would do with them: the SELECT entry goes
        session.select_entry, session.news = None, []
    return ""


def session_of(record: SessionRecord, sock: socket.socket, traits: ServerTraits) -> BackendSession:
    """The ``BackendSession`` of a session handed over (``Proxy.adopt``)."""
    session = BackendSession(sock, (record.backend_host, record.backend_port), record.login)
    session.username, session.server = record.username, record.server
    session.origin_ip = record.origin_ip
    session.select_entry, session.selected = record.select_entry, record.selected
    session.traits = traits
    if traits.closed_line is None:
        traits.closed_line = record.closed_line
    return session


# -- the successor's side ---------------------------------------------------------------------


@dataclass
class Received:
    """What the successor got before it starts serving."""

    channel: Channel
    pid: int  # the running proxy's
    listeners: list[tuple[Listener, socket.socket]]
    key: bytes
    sessions: list[tuple[SessionRecord, socket.socket]] = field(default_factory=list)
    order: ReceiveOrder = field(default_factory=ReceiveOrder)
    processes: int = 1  # the running proxy's (``workers N``): one conversation with each
    others: list[Received] = field(default_factory=list)  # the other processes' conversations

    def session_count(self) -> int:
        return len(self.sessions)

    def close_channels(self) -> None:
        """A process that does not talk to the running proxy (a successor's supervisor, once
        its workers have their copies): the running proxy sees the end when they have too."""
        for part in (self, *self.others):
            part.channel.close()

    def close_sessions(self) -> None:
        """Close this process's copies of the sessions (the workers adopted theirs)."""
        sessions, self.sessions = self.sessions, []
        for _, sock in sessions:
            sock.close()

    def take_from(self, other: Received) -> None:
        """Another process of the same running proxy: its sessions join these; its
        listeners (the same sockets again) are closed."""
        if other.key != self.key:
            raise TransferError("the running proxy's processes sent different keys")
        self.sessions += other.sessions
        other.sessions = []
        for _, sock in other.listeners:
            sock.close()
        other.listeners = []
        self.others.append(other)

    def take_listener(
        self, role: ListenerRole, family: int, address: object
    ) -> socket.socket | None:
        """The inherited listener for this role and address, if there is one (taken)."""
        for index, (listener, sock) in enumerate(self.listeners):
            if listener.role is role and listener.family == family and _same_address(sock, address):
                del self.listeners[index]
                return sock
        return None

    def close_leftovers(self) -> None:
        """Close the inherited listeners the configuration no longer has (a changed
        ``listen_port``, say): the successor has bound the new ones."""
        leftovers, self.listeners = self.listeners, []
        for listener, sock in leftovers:
            LOGGER.warning(
                "hand-over: %s listener %s port %d is not in the configuration: closed",
                listener.role.name,
                listener.host,
                listener.port,
            )
            sock.close()

    def receive_late(self, adopt: Callable[[SessionRecord, socket.socket], None]) -> int:
        """Adopt sessions checked in late at the old process, until END; their count."""
        count = 0
        while True:
            try:
                message, fds = self.channel.receive(None)
                phase = self.order.receive(message)
            except TransferError as error:
                LOGGER.info("hand-over: the old process's connection ended (%s)", error)
                break
            if isinstance(message, SessionRecord):
                adopt(message, socket.socket(fileno=_one_fd(fds, "a session")))
                count += 1
            if phase is Phase.DONE:
                break
        self.channel.close()
        return count


def adopt_all(
    proxy: Proxy, received: Received, owned: Callable[[SessionRecord], bool] | None = None
) -> None:
    """The running proxy's key and cached sessions, into this one's cache (one ``adopt`` a
    session). With workers, ``owned`` picks this worker's users; the others' sessions are
    its owner's to adopt (each worker has a copy of every descriptor: this one closes its)."""
    proxy.hasher = CredentialHasher(received.key)
    ours = [(r, sock) for r, sock in received.sessions if owned is None or owned(r)]
    theirs = [sock for r, sock in received.sessions if owned is not None and not owned(r)]
    received.sessions = []
    for sock in theirs:  # another worker's: its copy stays open there
        sock.close()
    adopted = sum(proxy.adopt(record, sock) for record, sock in ours)
    LOGGER.info("hand-over: %d of %d sessions adopted", adopted, len(ours))


def serve_late(proxy: Proxy, received: Received) -> None:
    """Tell the running proxy this one accepts (it stops); adopt what it ships until it exits
    (with workers, ``Proxy.adopt`` passes a session of another worker's user to its owner)."""
    for part in (received, *received.others):
        try:
            part.channel.send(Marker(Kind.READY, os.getpid()))
        except OSError as error:
            LOGGER.warning("hand-over: READY not delivered to pid %d (%s)", part.pid, error)
            part.channel.close()
            continue
        gevent.spawn(part.receive_late, proxy.adopt)


def receive_all(path: str) -> Received:
    """``receive`` from every process of the running proxy (its HELLO says how many: one
    conversation each, in turn); one ``Received`` with all their sessions."""
    first = receive(path)
    try:
        for _ in range(first.processes - 1):
            first.take_from(receive(path))
    except BaseException:
        for part in (first, *first.others):
            for _, sock in part.listeners:
                sock.close()
            part.close_sessions()
            part.channel.close()
        raise
    return first


def serving(
    proxy: Proxy,
    sock: socket.socket | None,
    listeners: list[socket.socket],
    tls_listeners: list[socket.socket],
    metrics_listeners: list[socket.socket],
    root_only: bool = False,
) -> Handover | None:
    """The running proxy's end of hand-overs on ``sock`` (None: hand-overs are off);
    ``root_only``: the proxy dropped root (``peer_allowed``)."""
    if sock is None:
        return None
    roles = (
        [(ListenerRole.IMAP, s) for s in listeners]
        + [(ListenerRole.IMAP_TLS, s) for s in tls_listeners]
        + [(ListenerRole.METRICS, s) for s in metrics_listeners]
        + [(ListenerRole.TAKEOVER, sock)]
    )
    return Handover(proxy, sock, Served(roles), root_only)


def _same_address(sock: socket.socket, address: object) -> bool:
    name = sock.getsockname()
    if isinstance(name, str) or not isinstance(address, tuple):
        return name == address
    return tuple(name[:2]) == tuple(address[:2])


def receive(path: str) -> Received:
    """Connect to the running proxy at ``path`` and take everything it sends before SENT.

    ``TransferError`` when there is nobody there, or it refuses, or breaks off (then this
    process takes nothing: the running one keeps serving).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(path)
    except OSError as error:
        sock.close()
        raise TransferError(f"no running imapproxy at {path}: {error.strerror}") from None
    channel = Channel(sock)
    received: Received | None = None
    try:
        channel.send(Hello(FORMAT_VERSION, os.getpid()))
        received = _receive_until_sent(channel)
        return received
    except BaseException:
        if received is None:
            channel.close()
        raise


def _receive_until_sent(channel: Channel) -> Received:
    order = ReceiveOrder()
    hello = _expect(channel, order, Hello, HELLO_TIMEOUT_S)[0]
    listeners_message, fds = _expect(channel, order, Listeners, HELLO_TIMEOUT_S)
    if len(fds) != len(listeners_message.listeners):
        _close_fds(fds)
        raise TransferError(f"{len(listeners_message.listeners)} listeners, {len(fds)} descriptors")
    listeners = [
        (listener, socket.socket(fileno=fd))
        for listener, fd in zip(listeners_message.listeners, fds, strict=True)
    ]
    key = _expect(channel, order, HasherKey, HELLO_TIMEOUT_S)[0].key
    received = Received(channel, hello.pid, listeners, key, order=order, processes=hello.processes)
    try:
        while True:
            message, fds = channel.receive(READY_TIMEOUT_S)
            phase = order.receive(message)
            if isinstance(message, SessionRecord):
                received.sessions.append((message, socket.socket(fileno=_one_fd(fds, "a session"))))
            else:
                _close_fds(fds)
            if phase is Phase.LATE:
                return received
    except BaseException:
        for _, sock in listeners:
            sock.close()
        for _, sock in received.sessions:
            sock.close()
        raise


M = TypeVar("M", Hello, Listeners, HasherKey)


def _expect(
    channel: Channel, order: ReceiveOrder, kind: type[M], timeout: float
) -> tuple[M, list[int]]:
    message, fds = channel.receive(timeout)
    order.receive(message)
    if not isinstance(message, kind):
        _close_fds(fds)
        raise TransferError(f"expected {kind.__name__}, got {type(message).__name__}")
    return message, fds

"""The data plane: copying backend bytes to the client, scanning them on the way.

``recv_into`` one buffer, ``ResponseScanner.scan`` it (tagged completions, ``+`` lines, literal
lengths; no per-line work in Python), ``sendall`` the same memory, until the caller's condition
holds. That is all the proxy does with a backend's reply. The rest of a large literal (a
message body in a bulk FETCH) is not even read: the kernel moves it to the client (``splice``),
and the scanner only counts it.

The relay runs it two ways: inline (sequential mode: after forwarding a command, read until
its completion, in the connection's own greenlet) or as the pump greenlet (duplex mode, for
IDLE and NOTIFY, when the server speaks unprompted). Between calls only the scanner's state
and up to a few bytes of context (``carry``) are kept, so an idle session holds no buffer.
"""

from __future__ import annotations

from collections.abc import Callable

from gevent import socket, ssl

from imapproxy import splice
from imapproxy.protocol.scanner import INITIAL_CARRY, MAX_TAGGED_PREFIX_BYTES, ResponseScanner
from imapproxy.send import send_quietly
from imapproxy.trace import SessionTrace
from imapproxy.waits import SocketWaits

FIRST_READ_BYTES = 16384  # most replies (a webmail page's FETCH) fit in one or two reads
MAX_READ_BYTES = 262144  # reads double up to this while they keep filling the buffer (bulk)
# A client that vanishes mid-FETCH leaves the rest of the reply to drain before the session can
# be reused; beyond this much it is cheaper to drop the session (a new login costs ~1.5 ms).
DRAIN_MAX_BYTES = 16 << 20
DEFAULT_TIMEOUT_S = 30.0  # a read's wait unless the relay says (server_response_timeout's default)
_SPARE = MAX_TAGGED_PREFIX_BYTES + 2  # room for the carried context in front of each read


# Read buffers are kept for the next copy (of any session) instead of being allocated, zeroed
# and, past glibc's mmap threshold, mapped and unmapped for every reply; at most this many of
# each size wait unused.
POOLED_BUFFERS_PER_SIZE = 16
_free_buffers: dict[int, list[bytearray]] = {}
_POOLED_SIZES = frozenset(
    FIRST_READ_BYTES << n for n in range(8) if FIRST_READ_BYTES << n <= MAX_READ_BYTES
) | {MAX_READ_BYTES}


def _take_buffer(size: int) -> bytearray:
    free = _free_buffers.get(size)
    return free.pop() if free else bytearray(size + _SPARE)


def _give_buffer(buf: bytearray) -> None:
    """Keep ``buf`` for reuse (its contents are never read before being overwritten: scans
    and sends stop at the end of what was received)."""
    size = len(buf) - _SPARE
    if size not in _POOLED_SIZES:
        return  # an odd size (a large first read): not worth keeping
    free = _free_buffers.setdefault(size, [])
    if len(free) < POOLED_BUFFERS_PER_SIZE:
        free.append(buf)


class BackendGone(Exception):
    """The backend closed the connection or failed to read."""


class DrainExceeded(Exception):
    """The client left and too much is still coming to be worth draining."""


class Copier:
    """Backend to client, for one session."""

    def __init__(
        self,
        backend: socket.socket,
        client: socket.socket,
        scanner: ResponseScanner,
        on_events: Callable[[], None],
        initial: bytes = b"",
        *,
        waits: SocketWaits | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.backend = backend
        self.waits = waits or SocketWaits(backend)  # the backend's reads
        self.timeout = timeout  # how long a read may wait (the relay sets it)
        self.client = client
        self.scanner = scanner
        self.on_events = on_events  # called when the scanner has events, before the send
        self.carry = INITIAL_CARRY
        self.initial = initial  # bytes read before the relay began (after a login reply)
        self.client_alive = True
        self.drained = 0
        self.spliced = 0  # literal bytes moved by the kernel (``splice``) in this session
        self.trace: SessionTrace | None = None
        # TLS hands back one record (16 KiB at most) per read: more are gathered before a send
        self.tls = isinstance(backend, ssl.SSLSocket)
        # a large literal's rest through the kernel (``splice``): plain TCP at both ends only
        self.splices = splice.AVAILABLE and not self.tls and not isinstance(client, ssl.SSLSocket)
        self.before_send: Callable[[], None] | None = None  # duplex: wait while C writes
        self.on_park: Callable[[bool], None] | None = None  # duplex: parked in recv or not

    def copy_until(self, done: Callable[[], bool], read_first: bool = False) -> None:
        """Copy until ``done()`` holds after a read (it is checked first too, unless
        ``read_first``: the backend is known to have something, maybe only its EOF).

        Raises ``BackendGone`` or ``DrainExceeded``.
        """
        if done() and not self.initial and not read_first:
            return
        size = max(FIRST_READ_BYTES, len(self.initial))
        buf = _take_buffer(size)
        view = memoryview(buf)
        carry = len(self.carry)
        buf[:carry] = self.carry
        if self.initial:
            end = carry + len(self.initial)
            buf[carry:end], self.initial = self.initial, b""
            carry = self._forward(buf, view, carry, end)
        recv_into, on_park = self.waits.recv_into, self.on_park
        try:
            while read_first or not done():
                read_first = False
                if on_park is not None:
                    on_park(True)
                try:
                    count = recv_into(view[carry : carry + size], self.timeout)
                finally:
                    if on_park is not None:
                        on_park(False)
                if not count:
                    raise BackendGone("connection closed by server")
                if self.tls and count < size:
                    count += self._more_records(view[carry + count : carry + size])
                carry = self._forward(buf, view, carry, carry + count)
                if self.scanner.literal_remaining >= splice.SPLICE_MIN_BYTES and self._may_splice():
                    self._splice_literal()  # the read ended inside the literal: carry is 0
                    continue
                if size < MAX_READ_BYTES and (
                    count == size or self.scanner.literal_remaining > size
                ):  # bulk data (a full read, or a big literal under way): read bigger pieces
                    size = MAX_READ_BYTES if count < size else size * 2
                    bigger = _take_buffer(size)
                    bigger[:carry] = buf[:carry]
                    view.release()
                    _give_buffer(buf)
                    buf, view = bigger, memoryview(bigger)
        except TimeoutError:
            raise  # the caller's time limit (``timeout``): not a broken connection
        except OSError as error:
            raise BackendGone(f"read error: {error}") from None
        finally:
            self.carry = bytes(buf[:carry])
            view.release()
            _give_buffer(buf)

    def _may_splice(self) -> bool:
        """The literal's bytes are needed by nobody here: no trace records them, no duplex
        pump shares the client socket, and a client is there to take them."""
        return (
            self.splices
            and self.client_alive
            and self.trace is None
            and self.before_send is None
            and self.on_park is None
        )

    def _splice_literal(self) -> None:
        """The rest of the literal under way, backend to client, without reading it here. A
        client gone meanwhile leaves what is still coming to the drain of ``copy_until``."""
        remaining = self.scanner.literal_remaining
        try:
            taken, delivered = splice.move(
                self.backend,
                self.client,
                remaining,
                self.timeout,
                self.client.gettimeout(),
            )
        except splice.SourceClosed:
            raise BackendGone("connection closed by server") from None
        self.scanner.skipped(taken)
        self.spliced += taken
        if not delivered:
            self.client_alive = False

    def _more_records(self, space: memoryview) -> int:
        """Read what TLS records have already arrived, without waiting; return the count."""
        timeout = self.backend.gettimeout()
        self.backend.settimeout(0.0)
        got = 0
        try:
            while got < len(space):
                count = self.backend.recv_into(space[got:])
                if not count:
                    break
                got += count
        except (ssl.SSLWantReadError, BlockingIOError, TimeoutError):
            pass  # nothing more yet
        finally:
            self.backend.settimeout(timeout)
        return got

    def _forward(self, buf: bytearray, view: memoryview, start: int, end: int) -> int:
        """Scan and send ``buf[start:end]``; return the carry for the next read."""
        carry = self.scanner.scan(buf, end)
        if self.scanner.events:
            self.on_events()
        if self.client_alive:
            if self.before_send is not None:
                self.before_send()
            if self.trace is not None:
                self.trace.server(bytes(view[start:end]))
            self.client_alive = send_quietly(self.client, view[start:end])
        else:
            self.drained += end - start
            if self.drained > DRAIN_MAX_BYTES:
                raise DrainExceeded("too much to drain after the client left")
        if carry:
            buf[:carry] = buf[end - carry : end]
        return carry

"""A large literal from the server to the client through the kernel alone: ``splice(2)``.

A literal's length comes before its bytes (RFC 9051 §4.3) and its bytes are data, never
protocol: the scanner has nothing to find in them. So once a large literal is under way (a
message body in a bulk FETCH), the rest of it is moved backend socket -> pipe -> client socket
by the kernel. It is never copied into the proxy and back out, and no buffer is held for it.

Only on plain TCP at both ends (TLS must be decrypted and encrypted here), and only where the
bytes are not needed in Python (no trace, sequential mode): ``Copier`` decides.

A pipe is lent to one move at a time and kept for the next one if it comes back empty; one that
still holds bytes (the client went mid-move) is closed, so that no byte of one reply can reach
another client.
"""

from __future__ import annotations

import fcntl
import os

import gevent
from gevent import socket
from gevent.socket import wait

SPLICE_MIN_BYTES = 65536  # below this, a read and a send cost less than the pipe's two calls
PIPE_BYTES = 1 << 20  # asked of F_SETPIPE_SZ (the kernel's pipe-max-size, 1 MiB by default)
POOLED_PIPES = 16
AVAILABLE = hasattr(os, "splice")

_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_MORE = getattr(os, "SPLICE_F_MORE", 0)
_free_pipes: list[_Pipe] = []


class SourceClosed(Exception):
    """The server closed the connection in the middle of the literal."""


class _Pipe:
    __slots__ = ("read_end", "write_end", "size")

    def __init__(self) -> None:
        self.read_end, self.write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.size = fcntl.fcntl(self.write_end, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:  # above pipe-max-size, or out of the user's pipe quota: the default
            self.size = fcntl.fcntl(self.write_end, fcntl.F_GETPIPE_SZ)

    def close(self) -> None:
        os.close(self.read_end)
        os.close(self.write_end)


def move(
    source: socket.socket,
    sink: socket.socket,
    count: int,
    source_timeout: float | None,
    sink_timeout: float | None,
) -> tuple[int, bool]:
    """Move ``count`` bytes from the socket ``source`` to the socket ``sink``; return how many
    were taken from ``source`` and whether ``sink`` took them all.

    A ``sink`` that fails or takes nothing for ``sink_timeout`` ends the move early (the
    bytes taken but not delivered are dropped with the pipe); the caller reads the rest.
    ``source`` silent for ``source_timeout``: ``TimeoutError``; closed: ``SourceClosed``; an
    error on it: ``OSError``.
    """
    pipe = _free_pipes.pop() if _free_pipes else _Pipe()
    ends = _Ends(source, sink)
    empty = False
    try:
        taken, delivered = _move(pipe, ends, count, source_timeout, sink_timeout)
        empty = delivered
        return taken, delivered
    finally:
        ends.close()
        if empty and len(_free_pipes) < POOLED_PIPES:
            _free_pipes.append(pipe)
        else:
            pipe.close()


class _Ends:
    """The two sockets' descriptors and watchers, made once per move rather than per wait."""

    __slots__ = ("source", "sink", "readable", "writable")

    def __init__(self, source: socket.socket, sink: socket.socket) -> None:
        loop = gevent.get_hub().loop
        self.source, self.sink = source.fileno(), sink.fileno()
        self.readable, self.writable = loop.io(self.source, 1), loop.io(self.sink, 2)

    def wait_source(self, timeout: float | None) -> None:
        wait(self.readable, timeout=timeout, timeout_exc=TimeoutError("timed out"))

    def wait_sink(self, timeout: float | None) -> None:
        wait(self.writable, timeout=timeout, timeout_exc=TimeoutError())

    def close(self) -> None:
        self.readable.close()
        self.writable.close()


def _move(
    pipe: _Pipe,
    ends: _Ends,
    count: int,
    source_timeout: float | None,
    sink_timeout: float | None,
) -> tuple[int, bool]:
    source, sink = ends.source, ends.sink
    taken = held = 0
    while taken < count or held:
        moved = False
        if taken < count and held < pipe.size:
            got = _splice(source, pipe.write_end, min(count - taken, pipe.size - held), _FLAGS)
            if got == 0:
                raise SourceClosed
            if got > 0:
                taken, held, moved = taken + got, held + got, True
        if held:
            try:
                put = _splice(pipe.read_end, sink, held, _FLAGS | (_MORE if taken < count else 0))
            except OSError:  # the client is gone
                return taken, False
            if put > 0:
                held, moved = held - put, True
        if moved:
            continue
        if held:  # the client's socket is full: its reading, not the server, is awaited
            try:
                ends.wait_sink(sink_timeout)
            except TimeoutError:
                return taken, False
        else:
            ends.wait_source(source_timeout)
    return taken, True


def _splice(source: int, sink: int, count: int, flags: int) -> int:
    """Bytes moved, 0 at the end of ``source``, -1 when it would block."""
    try:
        return os.splice(source, sink, count, flags=flags)
    except BlockingIOError:
        return -1

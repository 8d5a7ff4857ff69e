"""A raw IMAP client for the load generator: blocking socket, literal-aware reading.

No IMAP library: we need to control the socket (``TCP_QUICKACK`` after every read, or
nothing, as PHP leaves it) and to spend as little CPU per byte as possible. A response is read
line by line until the tagged completion; a line ending in ``{n}`` (RFC 9051 §4.3) is followed
by ``n`` bytes of literal, which are skipped without being looked at, so a 10 MB message body
costs a few ``recv_into`` calls and no copies.

A connection may speak implicit TLS (RFC 8314 §3.2: the handshake right after connect, before
the greeting), as webmail does to port 993; the context comes from the caller. It may also
begin with a PROXY protocol v2 header (haproxy ``doc/proxy-protocol.txt`` §2.2), as a load
balancer with ``send-proxy-v2`` does: the client address the caller names, the real ports.

Every failure becomes a ``WireError`` whose ``kind`` is the error class the report counts:
``connect`` (refused, timed out), ``tls`` (the handshake failed), ``timeout`` (no reply in
time), ``closed`` (EOF), or ``NO``/``BAD``/``BYE`` followed by the command (a non-OK tagged
reply or a bad greeting).
"""

from __future__ import annotations

import errno
import socket
import ssl
import struct
from dataclasses import dataclass

RECV_BYTES = 65536
LITERAL_CHUNK_BYTES = 1 << 20
REUSE_CODE = b"[XPROXYREUSE]"  # up-imapproxy's and imapproxy's reuse notice


class WireError(Exception):
    """A failed exchange; ``kind`` is what the error table counts."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


@dataclass
class Reply:
    """What a command's response held, as far as the benchmark cares."""

    status: bytes  # OK, NO, BAD
    literals: int = 0
    literal_bytes: int = 0
    reused: bool = False  # an untagged [XPROXYREUSE] came before the tagged line


class Connection:
    """One client connection. ``quickack`` sets ``TCP_QUICKACK`` after every ``recv``."""

    def __init__(self, sock: socket.socket, *, quickack: bool) -> None:
        self.sock = sock
        self.quickack = quickack
        self.buffer = bytearray()
        self.pos = 0
        self.scratch: memoryview | None = None  # for large literals, allocated when needed
        self.next_tag = 0

    @classmethod
    def open(
        cls,
        host: str,
        port: int,
        *,
        quickack: bool,
        timeout_s: float,
        tls: ssl.SSLContext | None = None,
        proxy_source: str = "",
    ) -> Connection:
        """Connect (with ``proxy_source``: then a PROXY v2 header naming that IPv4 address as
        the client's; with ``tls``: then the TLS handshake) and read the greeting, ``* OK``.

        The socket stays in blocking mode, its time-outs set with ``SO_RCVTIMEO`` and
        ``SO_SNDTIMEO`` (which also bounds ``connect`` on Linux): Python's own time-outs would
        add a ``poll`` before every ``recv``.
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        limit = struct.pack("ll", int(timeout_s), int(timeout_s % 1 * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
        try:
            sock.connect((host, port))
        except OSError as error:
            sock.close()
            raise WireError("connect", str(error)) from None
        if proxy_source:
            send_proxy_header(sock, proxy_source)
        if tls is not None:
            sock = handshake(sock, tls, host)
        connection = cls(sock, quickack=quickack)
        try:
            greeting = connection.read_line()
        except WireError:
            connection.close()
            raise
        if not greeting.startswith(b"* OK"):
            connection.close()
            raise WireError("greeting", greeting[:60].decode(errors="replace"))
        return connection

    def close(self) -> None:
        self.sock.close()

    # -- reading --------------------------------------------------------------------------------

    def _fill(self) -> None:
        """Append at least one byte from the socket to the buffer."""
        if self.pos:
            del self.buffer[: self.pos]
            self.pos = 0
        try:
            data = self.sock.recv(RECV_BYTES)
        except OSError as error:
            raise failure(error) from None
        if not data:
            raise WireError("closed", "EOF")
        if self.quickack:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        self.buffer += data

    def read_line(self) -> bytes:
        """One line including its CRLF (literals are the caller's business)."""
        while True:
            end = self.buffer.find(b"\n", self.pos)
            if end >= 0:
                line = bytes(self.buffer[self.pos : end + 1])
                self.pos = end + 1
                return line
            self._fill()

    def skip(self, count: int) -> None:
        """Discard ``count`` bytes of literal: first from the buffer, then from the socket."""
        buffered = min(count, len(self.buffer) - self.pos)
        self.pos += buffered
        count -= buffered
        if count > 0 and self.scratch is None:
            self.scratch = memoryview(bytearray(LITERAL_CHUNK_BYTES))
        while count > 0:
            assert self.scratch is not None
            try:
                got = self.sock.recv_into(self.scratch, min(count, LITERAL_CHUNK_BYTES))
            except OSError as error:
                raise failure(error) from None
            if not got:
                raise WireError("closed", "EOF in literal")
            if self.quickack:
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            count -= got

    def read_reply(self, tag: bytes) -> Reply:
        """Read up to and including the tagged line of ``tag``, skipping literals."""
        reply = Reply(b"")
        prefix = tag + b" "
        while True:
            line = self.read_line()
            if line.endswith(b"}\r\n"):
                size = int(line[line.rindex(b"{") + 1 : -3].rstrip(b"+"))
                reply.literals += 1
                reply.literal_bytes += size
                self.skip(size)
            elif line.startswith(prefix):
                reply.status = line[len(prefix) :].split(b" ", 1)[0].rstrip(b"\r\n")
                return reply
            elif REUSE_CODE in line and line.startswith(b"* OK"):
                reply.reused = True

    # -- commands -------------------------------------------------------------------------------

    def command(self, text: bytes, name: str) -> Reply:
        """Send ``<tag> text`` and read the reply; anything but OK raises ``WireError``."""
        self.next_tag += 1
        tag = b"b%d" % self.next_tag
        try:
            self.sock.sendall(tag + b" " + text + b"\r\n")
        except OSError as error:
            raise failure(error) from None
        reply = self.read_reply(tag)
        if reply.status != b"OK":
            raise WireError(f"{reply.status.decode(errors='replace')} {name}")
        return reply

    def login(self, user: str, password: str) -> Reply:
        return self.command(b"LOGIN " + quoted(user) + b" " + quoted(password), "LOGIN")

    def logout(self) -> None:
        self.command(b"LOGOUT", "LOGOUT")


PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PROXY_V2_TCP4 = struct.Struct("!12sBBH4s4sHH")  # signature, ver/cmd, family, length, addresses


def proxy_v2_header(client: tuple[str, int], server: tuple[str, int]) -> bytes:
    """A v2 ``PROXY`` header for TCP over IPv4 (§2.2): version 2 command PROXY (0x21),
    AF_INET + STREAM (0x11), 12 bytes of addresses and ports, no TLVs."""
    return PROXY_V2_TCP4.pack(
        PROXY_V2_SIGNATURE,
        0x21,
        0x11,
        12,
        socket.inet_aton(client[0]),
        socket.inet_aton(server[0]),
        client[1],
        server[1],
    )


def send_proxy_header(sock: socket.socket, client_address: str) -> None:
    """The header on a connected socket: ``client_address`` with the socket's own port."""
    try:
        _, client_port = sock.getsockname()
        header = proxy_v2_header((client_address, client_port), sock.getpeername())
        sock.sendall(header)
    except OSError as error:
        sock.close()
        raise failure(error) from None


def handshake(sock: socket.socket, context: ssl.SSLContext, host: str) -> ssl.SSLSocket:
    """The TLS handshake on a connected socket, the server checked against ``host``."""
    try:
        return context.wrap_socket(sock, server_hostname=host)
    except OSError as error:
        sock.close()
        kind = "timeout" if failure(error).kind == "timeout" else "tls"
        raise WireError(kind, str(error)) from None


def failure(error: OSError) -> WireError:
    """A socket error as the report counts it: a time-out (EAGAIN from SO_RCVTIMEO, which a
    TLS socket reports as "want read/write") or not."""
    if isinstance(error, (TimeoutError, ssl.SSLWantReadError, ssl.SSLWantWriteError)):
        return WireError("timeout")
    if error.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
        return WireError("timeout")
    return WireError("closed", str(error))


def quoted(text: str) -> bytes:
    """An IMAP quoted string (RFC 9051 §4.3): backslash and double quote escaped."""
    return b'"' + text.encode().replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'

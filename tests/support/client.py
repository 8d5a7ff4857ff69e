"""A raw IMAP client for exact protocol checks (literal-aware reading, bounded waits)."""

from __future__ import annotations

import imaplib
import re
import socket
import ssl
import time

_LITERAL_AT_END = re.compile(rb"\{(\d+)\+?\}\r\n$")


class RawClient:
    def __init__(
        self,
        host: str,
        port: int,
        timeout: float = 10.0,
        tls: ssl.SSLContext | None = None,
        source: str | None = None,  # a loopback address of the test's choice: 127.0.0.5
    ) -> None:
        source_address = (source, 0) if source else None
        self.sock = socket.create_connection((host, port), timeout, source_address)
        if tls is not None:  # implicit TLS (port 993 style)
            self.sock = tls.wrap_socket(self.sock, server_hostname=host)
        self.buffer = b""
        self.greeting = self.read_line()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError(f"connection closed; buffered: {self.buffer[:200]!r}")
        self.buffer += data

    def read_line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self._fill()
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line + b"\r\n"

    def read_exact(self, count: int) -> bytes:
        while len(self.buffer) < count:
            self._fill()
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def read_response(self) -> bytes:
        """One whole response: a line and any literals it announces."""
        parts = []
        while True:
            line = self.read_line()
            parts.append(line)
            match = _LITERAL_AT_END.search(line)
            if match is None:
                return b"".join(parts)
            parts.append(self.read_exact(int(match.group(1))))

    def read_until_tagged(self, tag: bytes) -> list[bytes]:
        responses = []
        while True:
            response = self.read_response()
            responses.append(response)
            if response.startswith(tag + b" "):
                return responses

    def command(self, tag: bytes, text: bytes) -> list[bytes]:
        self.send(tag + b" " + text + b"\r\n")
        return self.read_until_tagged(tag)

    def read_available(self, wait: float = 0.3) -> bytes:
        """Whatever arrives within ``wait`` seconds (for checks that nothing is pending)."""
        self.sock.settimeout(wait)
        deadline = time.monotonic() + wait
        try:
            while time.monotonic() < deadline:
                data = self.sock.recv(65536)
                if not data:
                    break
                self.buffer += data
        except TimeoutError:
            pass
        data, self.buffer = self.buffer, b""
        return data

    def is_closed(self, wait: float = 5.0) -> bool:
        self.sock.settimeout(wait)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buffer += data
        except TimeoutError:
            return False
        except OSError:
            return True


def login(host: str, port: int, user: str, password: str) -> tuple[RawClient, list[bytes]]:
    client = RawClient(host, port)
    return client, client.command(b"L1", b'LOGIN "%s" "%s"' % (user.encode(), password.encode()))


REUSED = b"* OK [XPROXYREUSE]"


def imaplib_reused(imap: imaplib.IMAP4) -> bool:
    """Whether an ``imaplib`` login through the proxy got a cached session."""
    return any(b"[XPROXYREUSE]" in line for line in imap.untagged_responses.get("OK", []))


def logged_in(host: str, port: int, user: str, password: str) -> tuple[RawClient, list[bytes]]:
    """``login`` that must succeed; the client and the LOGIN's replies."""
    client, replies = login(host, port, user, password)
    assert replies[-1].startswith(b"L1 OK"), replies
    return client, replies


def assert_in_sync(client: RawClient, user: str) -> None:
    """A (reused) session answers as a fresh one would: nothing of an earlier command's reply
    before the NOOP's completion or after the FETCH's, and the user's own first message."""
    noop = client.command(b"n", b"NOOP")
    assert noop[-1].startswith(b"n OK"), noop
    assert all(r.startswith(b"* ") and b" FETCH " not in r for r in noop[:-1]), noop
    assert client.command(b"s", b"SELECT INBOX")[-1].startswith(b"s OK [READ-WRITE]")
    fetched = client.command(b"f", b"FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert f"{user} message 1".encode() in fetched[0] and fetched[-1].startswith(b"f OK"), fetched
    assert client.read_available() == b""


def page(host: str, port: int, user: str, password: str) -> list[bytes]:
    """A short webmail page (LOGIN, SELECT INBOX, LOGOUT) that must succeed; the LOGIN's
    replies (``replies[0].startswith(REUSED)`` on reuse)."""
    client, replies = logged_in(host, port, user, password)
    assert client.command(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
    client.command(b"z", b"LOGOUT")
    client.close()
    return replies

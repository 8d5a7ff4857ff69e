"""A raw IMAP client for exact protocol checks (literal-aware reading, bounded waits)."""

from __future__ import annotations

import re
import socket
import ssl
import time

_LITERAL_AT_END = re.compile(rb"\{(\d+)\+?\}\r\n$")


class RawClient:
    def __init__(
        self, host: str, port: int, timeout: float = 10.0, tls: ssl.SSLContext | None = None
    ) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
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

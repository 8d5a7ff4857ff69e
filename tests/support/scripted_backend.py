"""ScriptedBackend: a fake IMAP server, only for faults a real Dovecot cannot be made to produce
(silence, half lines, resets, garbage, an autologout BYE at a chosen moment).

Each accepted connection runs ``script(conn, number)`` in a thread of its own; ``number`` counts
connections from 0 (the proxy's start-up probe). ``Conn`` offers the few moves a script needs.
``serve_imap`` is a minimal well-behaved server (greeting, CAPABILITY, LOGIN, NOOP, UNSELECT,
SELECT, LOGOUT) that scripts use for their normal parts.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable

GREETING = b"* OK [CAPABILITY IMAP4rev1 LITERAL+ ID IDLE UNSELECT AUTH=PLAIN] Scripted ready.\r\n"
WAIT_LIMIT_S = 30.0  # no script waits longer than this for anything


class Conn:
    def __init__(self, sock: socket.socket, release: threading.Event) -> None:
        self.sock = sock
        self.sock.settimeout(WAIT_LIMIT_S)
        self.buffer = b""
        self.release = release

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_line(self) -> bytes:
        """The next line from the proxy (b"" when it closed)."""
        while b"\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                return b""
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def hang(self) -> None:
        """Say nothing until the test ends (bounded)."""
        self.release.wait(WAIT_LIMIT_S)

    def reset(self) -> None:
        """Close with a TCP RST instead of a FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def serve_imap(conn: Conn, *, greet: bool = True, stop_after: bytes | None = None) -> bytes | None:
    """Answer like a tiny IMAP server until LOGOUT or EOF; return the command named
    ``stop_after`` (upper-case) when it arrives, without answering it."""
    if greet:
        conn.send(GREETING)
    while line := conn.read_line():
        tag, _, rest = line.rstrip(b"\r\n").partition(b" ")
        command = rest.split(b" ", 1)[0].upper()
        if stop_after is not None and command == stop_after:
            return line
        if command == b"LOGOUT":
            conn.send(b"* BYE bye\r\n" + tag + b" OK done\r\n")
            return None
        conn.send(_reply(tag, command))
    return None


def _reply(tag: bytes, command: bytes) -> bytes:
    if command == b"CAPABILITY":
        return b"* CAPABILITY IMAP4rev1 IDLE UNSELECT\r\n" + tag + b" OK done\r\n"
    if command == b"LOGIN":
        return tag + b" OK [CAPABILITY IMAP4rev1 IDLE UNSELECT] Logged in\r\n"
    if command in (b"SELECT", b"EXAMINE"):
        return (
            b"* FLAGS (\\Seen)\r\n* 1 EXISTS\r\n* 0 RECENT\r\n* OK [UIDVALIDITY 1] x\r\n"
            + tag
            + b" OK [READ-WRITE] done\r\n"
        )
    return tag + b" OK done\r\n"


class ScriptedBackend:
    """A loopback server whose connections follow ``script``."""

    def __init__(self, script: Callable[[Conn, int], None]) -> None:
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.host, self.port = "127.0.0.1", self.listener.getsockname()[1]
        self.release = threading.Event()  # ends hangs at teardown
        self.connections = 0
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> ScriptedBackend:
        self._acceptor.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.listener.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            number, self.connections = self.connections, self.connections + 1
            thread = threading.Thread(target=self._run, args=(sock, number), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run(self, sock: socket.socket, number: int) -> None:
        conn = Conn(sock, self.release)
        with contextlib.suppress(OSError):
            self.script(conn, number)
        with contextlib.suppress(OSError):
            sock.close()

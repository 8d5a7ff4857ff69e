"""``python -m bench.floor_relay --listen PORT --backend HOST:PORT``: the floor of a gevent relay.

The least a relay built on gevent can do between a client and an IMAP server that answer each
other strictly in turn: a ``StreamServer`` on 127.0.0.1; per client, ``TCP_NODELAY`` on both
sockets, a connection to the backend, its greeting forwarded, then one loop: ``recv`` from the
client, ``send`` to the backend, ``recv_into`` one buffer from the backend, ``send`` that to the
client. No parsing, cache, logging or time-outs. What it adds to a NOOP over direct Dovecot is
what any gevent relay pays, two hub waits per round trip (the client's read, the backend's),
so the report can set imapproxy's cost against it.

A reply may take more than one read (a bulk FETCH). The relay then keeps reading the backend,
forwarding each read as it comes, until a read ends with a line that starts with the client's
tag: the tagged completion ends the response (RFC 9051 §2.2.2). That is what imapproxy's
sequential relay does too, without its literal tracking: a literal whose bytes end a read with
a tag-like line would fool it (the benchmark's messages have none). Forwarding one read per
client request would hang the FETCH; a second greenlet pumping the backend would change the
NOOP's path. Reads go up to ``READ_BYTES``, imapproxy's largest, so that the bulk floor is not
held down by smaller reads than the proxy's.

Correct only for a client that waits for each reply before its next command, as the NOOP and
bulk workloads do: pipelining, IDLE or a literal from the client would break it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from gevent import socket
from gevent.server import StreamServer

CLIENT_RECV_BYTES = 65536  # as imapproxy's relay.CLIENT_RECV_BYTES
READ_BYTES = 262144  # imapproxy's copier.MAX_READ_BYTES: its reads in bulk
GREETING_RECV_BYTES = 65536
LISTEN_HOST = "127.0.0.1"

Handler = Callable[[socket.socket, tuple[str, int]], None]


def send_all(sock: socket.socket, data: bytes | memoryview) -> None:
    """All of ``data`` with plain ``send`` calls (gevent's ``sendall`` adds a ``getsockopt``)."""
    sent = sock.send(data)
    while sent < len(data):
        sent += sock.send(data[sent:])


def reply_state(buf: bytearray, count: int, tag: bytes, head: bytes) -> tuple[bool, bytes]:
    """Whether ``buf[:count]`` ends the reply to ``tag``, and the head of its unfinished line.

    ``head`` is up to ``len(tag)`` first bytes of a line begun in an earlier read (``b""`` when
    that read ended a line); the head returned is the same for the next read.
    """
    start = buf.rfind(b"\n", 0, count - 1) + 1  # of the read's last line, ended or not
    line_head = bytes(buf[start : min(count, start + len(tag))])
    if not start:
        line_head = (head + line_head)[: len(tag)]
    if buf[count - 1] == ord("\n"):
        return line_head == tag, b""
    return False, line_head


def relay(client: socket.socket, backend: socket.socket) -> None:
    """Client command to backend, backend reply to client, until either side closes."""
    buf = bytearray(READ_BYTES)
    view = memoryview(buf)
    while True:
        request = client.recv(CLIENT_RECV_BYTES)
        if not request:
            return
        send_all(backend, request)
        tag = request[: request.find(b" ") + 1]  # b"b12 " (no space: any line ends the reply)
        done, head = False, b""
        while not done:
            count = backend.recv_into(buf)
            if not count:
                return
            send_all(client, view[:count])
            done, head = reply_state(buf, count, tag, head)


def serve(backend_address: tuple[str, int]) -> Handler:
    """The per-client handler: connect to the backend, forward the greeting, relay."""

    def handle(client: socket.socket, address: tuple[str, int]) -> None:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            backend = socket.create_connection(backend_address)
        except OSError:
            return
        with backend:
            backend.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                send_all(client, backend.recv(GREETING_RECV_BYTES))
                relay(client, backend)
            except OSError:
                return  # a reset from either side: the client's socket closes on return

    return handle


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.floor_relay", description=__doc__)
    parser.add_argument("--listen", type=int, required=True, metavar="PORT")
    parser.add_argument("--backend", required=True, metavar="HOST:PORT")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    host, _, port = args.backend.rpartition(":")
    server = StreamServer((LISTEN_HOST, args.listen), serve((host, int(port))))
    server.serve_forever()  # until SIGTERM, whose default action ends the process


if __name__ == "__main__":
    main()

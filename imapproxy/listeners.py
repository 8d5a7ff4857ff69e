"""The listening sockets: bound at start-up (as root), or inherited from a predecessor.

The IMAP listeners (``listen_address``/``listen_port``, and ``client_tls_port``), the
``metrics_listen`` ones and the hand-over socket (``takeover_socket``). A successor
(``takeover``) takes the ones its predecessor passed it, by role and address, and binds only
what is new in the file. ``ListenError`` says what could not be bound (start-up ends with
``EX_OSERR``).
"""

from __future__ import annotations

from collections.abc import Sequence

from gevent import socket

from imapproxy import takeover
from imapproxy.config import Config
from imapproxy.session_transfer import ListenerRole


class ListenError(Exception):
    """A socket that cannot be bound or listened on (the message says which and why)."""


def bind_listeners(
    config: Config,
    port: int,
    inherited: takeover.Received | None = None,
    role: ListenerRole = ListenerRole.IMAP,
) -> list[socket.socket]:
    """The listeners on ``port``: those a successor inherited (``inherited``), else new ones."""
    hosts: Sequence[str | None] = config.listen_address or (None,)
    listeners = []
    for host in hosts:
        for family, address in _listen_addresses(host, port):
            sock = inherited.take_listener(role, family, address) if inherited else None
            listeners.append(sock or _listen(family, address, config, dual_stack=host is None))
    return listeners


def bind_metrics_listeners(
    config: Config, inherited: takeover.Received | None = None
) -> list[socket.socket]:
    """The ``metrics_listen`` sockets (bound as root, like the others), and the metrics module
    loaded (before a chroot hides the interpreter's files)."""
    if config.metrics_listen is None:
        return []
    from imapproxy import metrics  # noqa: F401  (prometheus_client only when it is used)

    host, port = config.metrics_listen
    listeners = []
    for family, address in _listen_addresses(host, port):
        sock = inherited.take_listener(ListenerRole.METRICS, family, address) if inherited else None
        listeners.append(sock or _listen(family, address, config, dual_stack=False))
    return listeners


def _listen_addresses(host: str | None, port: int) -> list[tuple[int, tuple[object, ...]]]:
    if host is None:  # all addresses: one dual-stack socket where IPv6 exists (RFC 3493 §5.3)
        if socket.has_ipv6:
            return [(socket.AF_INET6, ("::", port))]
        return [(socket.AF_INET, ("0.0.0.0", port))]
    try:
        infos = socket.getaddrinfo(
            host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
    except OSError as error:
        raise ListenError(f"listen_address {host}: {error}") from None
    unique = dict.fromkeys((info[0], info[4][:2]) for info in infos)
    return list(unique)


def _listen(
    family: int, address: tuple[object, ...], config: Config, *, dual_stack: bool
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
        if config.send_tcp_keepalives:
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1
            )  # accepted sockets inherit it
        sock.bind(address)
        sock.listen(config.listen_backlog)
    except OSError as error:
        sock.close()
        raise ListenError(
            f"cannot listen on {address[0]} port {address[1]}: {error.strerror}"
        ) from None
    return sock


def bind_handover_socket(path: str, inherited: takeover.Received | None) -> socket.socket | None:
    """The hand-over socket: the one inherited when it is at ``path``, else a new one."""
    if not path:
        return None
    sock = (
        inherited.take_listener(ListenerRole.TAKEOVER, socket.AF_UNIX, path) if inherited else None
    )
    if sock is not None:
        return sock
    try:
        return takeover.bind(path)
    except OSError as error:
        raise ListenError(f"cannot create takeover_socket {path}: {error.strerror}") from None

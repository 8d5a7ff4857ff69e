"""The XPROXY_* administrative commands, before login, with up-imapproxy's exact responses.

Only with ``enable_admin_commands yes`` and only from ``admin_allow`` addresses (loopback by
default): the commands have no authentication, so the port open to all would be a hole.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from imapproxy import __version__
from imapproxy.config import Config, in_networks
from imapproxy.router import is_down
from imapproxy.worker_message import AdminCall

if TYPE_CHECKING:
    from imapproxy.backend import Backend, BackendSession
    from imapproxy.cache import ConnectionCache
    from imapproxy.router import Router
    from imapproxy.session import AdminRequested
    from imapproxy.stats import Counters
    from imapproxy.trace import Tracer
    from imapproxy.worker_channel import WorkerChannel


class AdminView(Protocol):
    """What the admin commands may read (and, for the counters and the trace, reset) of the
    proxy: a narrow view, so that this module needs nothing of the server's."""

    config: Config
    clock: Callable[[], float]
    cache: ConnectionCache[BackendSession]
    tracer: Tracer | None
    counters: Counters
    backend: Backend
    router: Router
    workers: WorkerChannel | None


def allowed(config: Config, address: tuple[object, ...]) -> bool:
    return config.enable_admin_commands and in_networks(str(address[0]), config.admin_allow)


def execute(proxy: AdminView, request: AdminRequested) -> bytes:
    """The reply to an admin command; with ``workers N`` the commands that concern every
    worker's cache, counters or trace (``WHOLE_PROXY``) are run in all of them, and their
    untagged lines come before this worker's tagged one."""
    reply = _HANDLERS[request.name](proxy, request.tag, request.argument)
    if proxy.workers is None or request.name not in WHOLE_PROXY:
        return reply
    untagged, tagged = _split(reply)
    others = proxy.workers.call_others(AdminCall(request.name, request.argument))
    return untagged + others + tagged


def part(proxy: AdminView, name: bytes, argument: bytes | None) -> bytes:
    """This worker's share of a whole-proxy command taken by another worker: its effect here,
    and its untagged lines (the other worker gives the tagged status)."""
    if name not in WHOLE_PROXY:
        return b""
    return _split(_HANDLERS[name](proxy, b"x", argument))[0]


def _split(reply: bytes) -> tuple[bytes, bytes]:
    """(untagged lines, the tagged line) of a reply."""
    end = reply.rfind(b"\r\n", 0, len(reply) - 2)
    return (b"", reply) if end < 0 else (reply[: end + 2], reply[end + 2 :])


def _dumpicc(proxy: AdminView, tag: bytes, argument: bytes | None) -> bytes:
    """up-imapproxy's lines; when logins are routed, each with its session's server too."""
    server = proxy.router.routing
    lines = [
        b"* XPROXY_DUMPICC %d %s %s%s\r\n"
        % (
            slot.session.sd if slot.session else -1,
            slot.username,
            slot.state.value.encode(),
            b" " + slot.session.server.encode() if server and slot.session else b"",
        )
        for slot in proxy.cache.in_use()
    ]
    return b"".join(lines) + tag + b" OK Completed\r\n"


def _servers(proxy: AdminView, tag: bytes, argument: bytes | None) -> bytes:
    """``* XPROXY_SERVERS SERVER ADDRESS up|down FAILURES NEXT_PROBE_S``: every address
    tried, from the health records (NEXT_PROBE_S is 0 while up)."""
    now = proxy.clock()
    lines = [
        b"* XPROXY_SERVERS %s %s %s %d %d\r\n"
        % (
            record.server.encode(),
            record.address.encode(),
            record.state.value.encode(),
            record.failures,
            max(0, round(record.next_probe_at - now)) if is_down(record) else 0,
        )
        for record in proxy.router.health_view()
    ]
    return b"".join(lines) + tag + b" OK Completed\r\n"


def _trace(proxy: AdminView, tag: bytes, argument: bytes | None) -> bytes:
    tracer = proxy.tracer
    if tracer is None:
        return tag + b" NO internal server error\r\n"
    if argument is None:
        tracer.disable()
        return tag + b" OK Tracing disabled\r\n"
    if tracer.user is not None:
        return tag + b" BAD Tracing already enabled for user " + tracer.user + b"\r\n"
    tracer.enable(argument)
    return tag + b" OK Tracing enabled for user " + argument + b".\r\n"


def _newlog(proxy: AdminView, tag: bytes, argument: bytes | None) -> bytes:
    if proxy.tracer is None:
        return tag + b" NO internal server error\r\n"
    try:
        proxy.tracer.truncate()
    except OSError:
        return tag + b" NO internal server error\r\n"
    return tag + b" OK Logfile cleared\r\n"


def _resetcounters(proxy: AdminView, tag: bytes, argument: bytes | None) -> bytes:
    proxy.counters.reset(int(time.time()))
    return tag + b" OK Counters reset\r\n"


def _status(proxy: AdminView, tag: bytes, argument: bytes | None) -> bytes:
    """Ours: what is known of TLS with the IMAP server (``tls_status``), one line."""
    state = proxy.backend.tls_health.state
    since = (
        time.strftime(" since %Y-%m-%dT%H:%M:%SZ", time.gmtime(state.since)) if state.since else ""
    )
    text = f"BACKEND {proxy.backend.name} TLS {state.text()}{since}"
    line = text.encode("utf-8", "replace").replace(b"\r", b" ").replace(b"\n", b" ")
    return b"* XPROXY_STATUS " + line + b"\r\n" + tag + b" OK Completed\r\n"


def _version(proxy: AdminView, tag: bytes, argument: bytes | None) -> bytes:
    return b"* XPROXY_VERSION %s\r\n%s OK Completed\r\n" % (__version__.encode(), tag)


_HANDLERS = {
    b"XPROXY_DUMPICC": _dumpicc,
    b"XPROXY_TRACE": _trace,
    b"XPROXY_NEWLOG": _newlog,
    b"XPROXY_RESETCOUNTERS": _resetcounters,
    b"XPROXY_VERSION": _version,
    b"XPROXY_STATUS": _status,
    b"XPROXY_SERVERS": _servers,
}
# the commands whose answer is about every worker; the others read what is the same in all
WHOLE_PROXY = frozenset(
    (b"XPROXY_DUMPICC", b"XPROXY_TRACE", b"XPROXY_NEWLOG", b"XPROXY_RESETCOUNTERS")
)

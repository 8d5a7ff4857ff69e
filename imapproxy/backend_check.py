"""Saying what TLS with the IMAP server does: loudly on each change, and on demand.

* ``watch``: every change of ``Backend.tls_health`` (``tls_status``) is logged once: a failure
  at error level with the reason and the setting to look at, a recovery at notice level; the
  state is written to the statistics file for pimpstat's about view.
* ``recheck``: after a SIGHUP that touched TLS (or while TLS fails), one probe of the server,
  so that the new settings are judged at once, not at the next login.
* ``connect_check``: ``--check-config --connect``: connect, read the greeting, do TLS as logins
  would (``server_tls``, or STARTTLS when forced or when the server says LOGINDISABLED) with
  verification, and say what happened.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from imapproxy.backend import Backend
from imapproxy.config import Config
from imapproxy.errors import BackendFailure, BackendProtocolError, FailureKind, why
from imapproxy.log import NOTICE
from imapproxy.protocol import capability
from imapproxy.stats import Counters
from imapproxy.tls_status import FAILING, STATUSES, WORKING, TLSState

LOGGER = logging.getLogger("imapproxy")
EX_UNAVAILABLE = 69
EX_CONFIG = 78
# a reload changing one of these is worth a new look at the server
TLS_KEYS = frozenset({"server_tls", "force_tls", "server_hostname"})


def watch(backend: Backend, counters: Counters) -> None:
    backend.on_tls_change = lambda state: announce(backend, counters, state)


def announce(backend: Backend, counters: Counters, state: TLSState) -> None:
    counters.set_backend_tls(STATUSES.index(state.status), state.since, state.text())
    if state.status == FAILING:
        LOGGER.error(
            "TLS with IMAP server %s fails: %s; look at %s; logins get NO [UNAVAILABLE] "
            "until this is fixed",
            backend.name,
            state.reason,
            state.setting,
        )
    elif state.status == WORKING:
        LOGGER.log(NOTICE, "TLS with IMAP server %s works (%s)", backend.name, verified(backend))


def verified(backend: Backend) -> str:
    if backend.config.tls_verify_server:
        return "certificate and name verified"
    return "certificate not verified: tls_verify_server is no"


def recheck_needed(backend: Backend, applied: tuple[str, ...]) -> bool:
    touched = any(key.startswith("tls_") or key in TLS_KEYS for key in applied)
    return touched or backend.tls_health.state.status == FAILING


def recheck(backend: Backend) -> None:
    """One probe; a TLS change is announced by ``watch``, anything else only noted."""
    try:
        backend.probe()
    except Exception as error:  # a greenlet of its own: nothing may escape to the hub
        if not isinstance(error, BackendFailure) or error.kind is not FailureKind.TLS:
            LOGGER.info("reload: IMAP server %s not checked: %s", backend.name, why(error))


def connect_check(config: Config, backend: Backend, out: TextIO = sys.stdout) -> int:
    """``--check-config --connect``: 0, 69 (server unreachable) or 78 (TLS fails)."""
    try:
        backend.resolve()
        result = backend.probe()
    except (BackendFailure, BackendProtocolError, OSError) as error:
        state = backend.tls_health.state
        if isinstance(error, BackendFailure) and error.kind is FailureKind.TLS:
            text = state.text() if state.status == FAILING else f"failing: {error.detail}"
            print(f"in.imapproxyd: {backend.name}: TLS {text}", file=sys.stderr)
            return EX_CONFIG
        print(f"in.imapproxyd: {backend.name}: {why(error)}", file=sys.stderr)
        return EX_UNAVAILABLE
    if backend.tls_health.state.status == WORKING:
        how = "implicit TLS" if config.server_tls else "STARTTLS"
        tls = f"TLS ({how}) works, {verified(backend)}"
    else:
        tls = "no TLS: passwords go to the server in clear"
        if capability.has(result.prelogin_capabilities, b"STARTTLS"):
            tls += " (it offers STARTTLS: force_tls yes would use it)"
    out.write(f"connect: {backend.name}: greeting read; {tls}\n")
    return 0

"""What is known of TLS with the IMAP server: not tried yet, working, or failing (why, since
when, and which setting to look at), so that a set-up that can never work is said loudly once
and kept on show, not only seen as failed logins.

Sans-I/O: the caller passes the time; ``failed`` and ``succeeded`` return the new state when
it changed (the caller then logs it: at error level when it fails), None when it did not, so
that a thousand logins failing the same way make one loud line, not a thousand.

The state is shown by ``XPROXY_STATUS``, kept in the statistics file for pimpstat's about
view (``stats``), and printed by ``--check-config --connect``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

UNTRIED, WORKING, FAILING = "not tried", "working", "failing"
STATUSES = (UNTRIED, WORKING, FAILING)  # their index is the code in the statistics file


@dataclass(frozen=True)
class TLSState:
    status: str = UNTRIED
    reason: str = ""
    setting: str = ""  # what the admin should look at
    since: int = 0  # unix time of the change

    def text(self) -> str:
        """One line: ``working``, or ``failing: <reason> (look at <setting>)``."""
        if self.status != FAILING:
            return self.status
        return f"{FAILING}: {self.reason} (look at {self.setting})"


class TLSHealth:
    """The state, changed by each TLS handshake (or TLS failure) with the server."""

    def __init__(self) -> None:
        self.state = TLSState()

    def succeeded(self, now: int) -> TLSState | None:
        if self.state.status == WORKING:
            return None
        self.state = TLSState(WORKING, since=now)
        return self.state

    def failed(self, detail: str, now: int) -> TLSState | None:
        reason = _plain(detail)
        if self.state.status == FAILING and self.state.reason == reason:
            return None
        self.state = TLSState(FAILING, reason, setting_for(reason), now)
        return self.state


# (what the reason says, the settings to look at), first match wins; OpenSSL's own texts
_HINTS = (
    ("mismatch", "server_hostname (the name the server's certificate must carry)"),
    ("has expired", "the IMAP server's certificate (expired: renew it)"),
    ("not yet valid", "the IMAP server's certificate (not yet valid), or this host's clock"),
    ("self-signed", "tls_ca_file or tls_ca_path (the CA of the server's certificate)"),
    ("issuer", "tls_ca_file or tls_ca_path (the CA of the server's certificate)"),
    ("certificate verify failed", "tls_ca_file, tls_ca_path and tls_verify_server"),
    ("wrong version number", "server_tls and server_port (is this port TLS from the start?)"),
    ("record layer failure", "server_tls and server_port (is this port TLS from the start?)"),
    ("protocol version", "tls_no_tlsv1.2 (and the server's TLS versions)"),
    ("no protocols available", "tls_no_tlsv1.2 (and the server's TLS versions)"),
    ("handshake failure", "tls_ciphers (and the server's)"),
    ("certificate required", "tls_cert_file and tls_key_file (the server wants one)"),
    ("bad certificate", "tls_cert_file and tls_key_file (the server refuses ours)"),
    ("unknown ca", "tls_cert_file (the server does not trust its CA)"),
    ("starttls is not possible", "force_tls, server_tls (the server offers no STARTTLS)"),
    ("starttls refused", "force_tls (the server refuses STARTTLS)"),
)


def setting_for(reason: str) -> str:
    lowered = reason.lower()
    return next((hint for text, hint in _HINTS if text in lowered), "the tls_* settings")


_NOISE = re.compile(r"^\[\w+: \w+\] | \(_ssl\.c:\d+\)$")


def _plain(detail: str) -> str:
    """OpenSSL's text without its code in brackets and the ``_ssl`` module's source line:
    ``[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: ... (_ssl.c:1006)``."""
    return _NOISE.sub("", detail)

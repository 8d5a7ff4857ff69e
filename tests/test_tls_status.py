"""What is known of TLS with the IMAP server: one change, one loud line; the setting to look at."""

from __future__ import annotations

import pytest

from imapproxy.tls_status import FAILING, UNTRIED, WORKING, TLSHealth, TLSState, setting_for

UNKNOWN_CA = (
    "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer "
    "certificate (_ssl.c:1006)"
)


def test_each_change_is_reported_once() -> None:
    health = TLSHealth()
    assert health.state == TLSState(UNTRIED) and health.state.text() == "not tried"
    first = health.failed(UNKNOWN_CA, 100)
    assert first == TLSState(
        FAILING,
        "certificate verify failed: unable to get local issuer certificate",
        "tls_ca_file or tls_ca_path (the CA of the server's certificate)",
        100,
    )
    assert health.failed(UNKNOWN_CA, 101) is None  # the same failure again: nothing new
    assert first.text() == (
        "failing: certificate verify failed: unable to get local issuer certificate "
        "(look at tls_ca_file or tls_ca_path (the CA of the server's certificate))"
    )
    other = health.failed("[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)", 102)
    assert other is not None and other.setting.startswith("server_tls and server_port")
    assert health.succeeded(103) == TLSState(WORKING, since=103)
    assert health.succeeded(104) is None
    assert health.failed(UNKNOWN_CA, 105) is not None  # failing again after working: said again


@pytest.mark.parametrize(
    ("reason", "setting"),
    [
        (
            "certificate verify failed: Hostname mismatch, certificate is not valid for 'x'.",
            "server_hostname",
        ),
        (
            "certificate verify failed: IP address mismatch, certificate is not valid for '::1'.",
            "server_hostname",
        ),
        (
            "certificate verify failed: certificate has expired",
            "the IMAP server's certificate (expired",
        ),
        (
            "certificate verify failed: self-signed certificate in certificate chain",
            "tls_ca_file or tls_ca_path",
        ),
        ("tlsv13 alert certificate required", "tls_cert_file and tls_key_file"),
        ("TLS is required but STARTTLS is not possible; refusing", "force_tls, server_tls"),
        ("something new", "the tls_* settings"),
    ],
)
def test_the_setting_to_look_at(reason: str, setting: str) -> None:
    assert setting_for(reason).startswith(setting)

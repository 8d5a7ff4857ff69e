from __future__ import annotations

from imapproxy.protocol import capability

DOVECOT_PRELOGIN = tuple(
    b"IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS "
    b"AUTH=PLAIN AUTH=LOGIN AUTH=CRAM-MD5 LOGINDISABLED".split()
)


def test_prelogin_list_for_clients() -> None:
    caps = capability.for_clients(DOVECOT_PRELOGIN)
    assert caps == tuple(
        b"IMAP4rev1 LOGIN-REFERRALS ENABLE IDLE LITERAL+ ID SASL-IR AUTH=PLAIN "
        b"AUTH=LOGIN XIMAPPROXY".split()
    )


def test_starttls_and_logindisabled_when_the_proxy_says_so() -> None:
    caps = capability.for_clients((b"IMAP4rev1",), offer_starttls=True, login_disabled=True)
    assert caps == (b"IMAP4rev1", b"ID", b"STARTTLS", b"LOGINDISABLED", b"XIMAPPROXY")


def test_login_reply_loses_compress_only() -> None:
    reply = b"OK [CAPABILITY IMAP4rev1 COMPRESS=DEFLATE IDLE] Logged in"
    assert capability.filter_login_reply(reply) == b"OK [CAPABILITY IMAP4rev1 IDLE] Logged in"
    assert capability.filter_login_reply(b"OK Logged in") == b"OK Logged in"
    assert capability.filter_login_reply(b"OK [ALERT] x") == b"OK [ALERT] x"

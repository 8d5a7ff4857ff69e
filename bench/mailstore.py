"""The benchmark's Dovecot: its users and their mail, written straight into Maildir.

``doveadm save`` costs about 50 ms a message; 10,000 messages written as Maildir files
(``cur/<unique>:2,<flags>``, owned by the mail user) take about a second, and Dovecot indexes
them on the first SELECT, which the warm-up does. Files use LF line ends, as Dovecot's LDA
stores them (``mail_save_crlf = no``), so Dovecot adds the CRs when it sends a message.

Users:
- ``user000`` .. ``user199``: the webmail users, 50 messages each (1 to 9 KB, realistic
  headers; subjects of varying length so that each user's header FETCH has its own size, which
  the load generator checks to catch a proxy that hands out someone else's session);
- ``big0`` .. ``big2``: two 1 MB and two 10 MB messages each (the bulk workload);
- ``mem00000`` ..: empty mailboxes for the memory workload, one backend session each.

For the server over TLS, ``write_pki`` makes a ``trustme`` CA and a certificate for
127.0.0.1 (where the bench Dovecot listens) and ``localhost``; the Dovecot that gets them
offers implicit TLS on its ``imaps_port`` and STARTTLS on its cleartext port, where cleartext
LOGIN stays allowed (``disable_plaintext_auth = no``), so the other workloads are unchanged.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import trustme

from tests.support.dovecot import DovecotInstance, User, make_message

PASSWORD = "bench-secret"
MESSAGES_PER_USER = 50
BIG_SIZES = (1 << 20, 1 << 20, 10 << 20, 10 << 20)  # two 1 MB and two 10 MB per big user
BIG_USER_COUNT = 3

WORD_TEXT = (
    "quarterly report meeting lunch invoice travel plans review draft agenda update budget "
    "release notes question about the project weekly status photos from weekend reminder "
    "your order has shipped password expiry notice conference call minutes"
)
WORDS = tuple(WORD_TEXT.split())
NAMES = ("Alice Martin", "Bob Dupont", "Chen Wei", "Dana Kowalski", "Emeka Obi", "Fatima Zahra")


def webmail_users(count: int) -> list[str]:
    return [f"user{i:03d}" for i in range(count)]


def big_users() -> list[str]:
    return [f"big{i}" for i in range(BIG_USER_COUNT)]


def memory_users(count: int) -> list[str]:
    return [f"mem{i:05d}" for i in range(count)]


@dataclass(frozen=True)
class BenchPki:
    """The PEM files of the server over TLS (world-readable: Dovecot and nobody read them)."""

    ca: Path
    cert: Path  # the server certificate and its chain
    key: Path


def write_pki(directory: Path, host: str = "127.0.0.1") -> BenchPki:
    """A CA and a server certificate for ``host`` and ``localhost``, in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    pki = BenchPki(directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")
    ca.cert_pem.write_to_path(str(pki.ca))
    server = ca.issue_cert(host, "localhost")
    for index, pem in enumerate(server.cert_chain_pems):
        pem.write_to_path(str(pki.cert), append=index > 0)
    server.private_key_pem.write_to_path(str(pki.key))
    for path in (pki.ca, pki.cert, pki.key):
        path.chmod(0o644)
    return pki


class BenchDovecot(DovecotInstance):
    """A ``DovecotInstance`` that adds thousands of users at once and seeds Maildirs."""

    def add_users(self, names: Iterable[str], password: str) -> None:
        """Add users with one write of the passwd-file (``add_user`` rewrites it each time)."""
        for name in names:
            self.users[name] = User(name, password)
            maildir = self.home(name) / "Maildir"
            maildir.mkdir(parents=True, exist_ok=True)
            self._own(self.home(name))
            self._own(maildir)
        self._write_users()

    def seed(self, user: str, messages: Iterable[tuple[bytes, str]]) -> int:
        """Write ``(message, flags)`` pairs into the user's ``Maildir/cur``; returns the count."""
        maildir = self.home(user) / "Maildir"
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(exist_ok=True)
            self._own(maildir / sub)
        stamp = int(time.time())
        count = 0
        for count, (message, flags) in enumerate(messages, start=1):
            name = f"{stamp - 86400 + count}.M{count}P{os.getpid()}.bench:2,{flags}"
            path = maildir / "cur" / name
            path.write_bytes(message.replace(b"\r\n", b"\n"))
            self._own(path)
        return count

    def _own(self, path: Path) -> None:
        if os.geteuid() == 0:
            os.chown(path, self.uid, self.gid)


def webmail_message(user: str, index: int, rng: random.Random) -> tuple[bytes, str]:
    """One inbox message of 1 to 9 KB with the headers a real one has; 70 % are \\Seen."""
    subject = f"{user} #{index}: " + " ".join(rng.choices(WORDS, k=rng.randint(2, 12)))
    sender = rng.choice(NAMES)
    day = 1 + (index % 28)
    header = (
        f"Return-Path: <{sender.split()[0].lower()}@example.org>\r\n"
        f"Received: from mx.example.org (mx.example.org [192.0.2.{1 + index % 250}])\r\n"
        f"\tby mail.example.net with ESMTPS id {rng.getrandbits(48):012x}\r\n"
        f"\tfor <{user}@example.net>; Mon, {day:02d} Nov 2026 09:{index % 60:02d}:00 +0000\r\n"
        f"From: {sender} <{sender.split()[0].lower()}@example.org>\r\n"
        f"To: {user} <{user}@example.net>\r\n"
        f"Subject: {subject}\r\n"
        f"Date: Mon, {day:02d} Nov 2026 09:{index % 60:02d}:00 +0000\r\n"
        f"Message-ID: <{user}.{index}.{rng.getrandbits(32):08x}@example.org>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    )
    lines = [" ".join(rng.choices(WORDS, k=12)) for _ in range(rng.randint(10, 120))]
    body = "\r\n".join(lines) + "\r\n"
    return (header + body).encode(), "S" if rng.random() < 0.7 else ""


def seed_all(dovecot: BenchDovecot, users: int, memory_user_count: int) -> None:
    """Create every user of the benchmark and their mail (before ``dovecot.start()``)."""
    webmail = webmail_users(users)
    dovecot.add_users(webmail + big_users() + memory_users(memory_user_count), PASSWORD)
    for user in webmail:
        rng = random.Random(user)
        dovecot.seed(user, (webmail_message(user, i, rng) for i in range(MESSAGES_PER_USER)))
    for user in big_users():
        messages = (make_message(f"{user} big {i}", size=size) for i, size in enumerate(BIG_SIZES))
        dovecot.seed(user, ((message, "S") for message in messages))

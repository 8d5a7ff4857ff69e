"""A private Dovecot on loopback, from a config written into a temporary directory.

Used by the test fixtures, ``make demo`` and the benchmarks. Users live in a passwd-file
(``{PLAIN}`` passwords); mail belongs to the Debian ``mail`` user (uid/gid 8) when we are root,
else to the current user. Nothing in ``/etc/dovecot`` is read.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.processes import reap

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
DOVEADM = shutil.which("doveadm") or "/usr/bin/doveadm"
START_TIMEOUT_S = 20.0


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port}") from None
            time.sleep(0.05)


@dataclass(frozen=True)
class User:
    name: str
    password: str


BASE_CONFIG = """\
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.info.log
instance_name = {instance}
protocols = imap
listen = {listen}
{ssl}
disable_plaintext_auth = no
auth_mechanisms = plain login
first_valid_uid = {uid}
first_valid_gid = {gid}
default_internal_user = {internal_user}
default_login_user = {login_user}
mail_location = maildir:~/Maildir
mail_fsync = never
maildir_very_dirty_syncs = yes
auth_master_user_separator = *
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/masterusers
  master = yes
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {root}/users
}}
namespace inbox {{
  inbox = yes
}}
imap_id_log = *
login_trusted_networks = {login_trusted_networks}
auth_failure_delay = {auth_failure_delay}
protocol imap {{
  mail_max_userip_connections = {max_userip}
  rawlog_dir = {rawlog_dir}
}}
service imap-login {{
  inet_listener imap {{
    address = {listen}
    port = {port}
  }}
  inet_listener imaps {{
    address = {listen}
    port = {imaps_port}
    ssl = {imaps_ssl}
  }}
{login_tuning}
}}
service imap {{
{imap_tuning}
}}
# No per-IP auth penalty: behind a proxy every user shares the proxy's address (the proxy
# slows failures down itself); Dovecot's docs give this way to turn it off.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
default_client_limit = {client_limit}
default_process_limit = {process_limit}
"""

# Dovecot's own advice for throughput (dovecot-notes.md): long-lived login and imap processes.
FAST_LOGIN = """  service_count = 0
  process_min_avail = 2
  process_limit = 16
  client_limit = 5000"""
FAST_IMAP = """  service_count = 256
  process_min_avail = 8
  process_limit = 20000"""


class DovecotInstance:
    """A Dovecot started from ``root`` (a directory it owns), listening on 127.0.0.1."""

    def __init__(
        self,
        root: Path,
        *,
        listen: str = "127.0.0.1",
        fast: bool = False,
        ssl_cert: Path | None = None,
        ssl_key: Path | None = None,
        ssl_required: bool = False,
        ssl_client_ca: Path | None = None,
        rawlog: bool = False,
        client_limit: int = 1000,
        login_trusted_networks: str = "",
    ) -> None:
        self.root = root
        self.listen = listen  # Dovecot's "listen": one address, or several separated by ", "
        self.host = listen.split(",")[0].strip()  # where clients connect
        self.port = free_port(self.host)
        self.imaps_port = free_port(self.host)
        self.fast = fast
        self.ssl_cert, self.ssl_key, self.ssl_required = ssl_cert, ssl_key, ssl_required
        self.ssl_client_ca = ssl_client_ca  # logins need a client certificate from this CA
        self.rawlog = rawlog
        self.client_limit = client_limit
        self.login_trusted_networks = login_trusted_networks  # believes ID's x-originating-ip
        self.users: dict[str, User] = {}
        self.masters: dict[str, User] = {}
        self.uid, self.gid = (8, 8) if os.geteuid() == 0 else (os.geteuid(), os.getegid())
        self.config_path = root / "dovecot.conf"
        self.process: subprocess.Popen[bytes] | None = None

    # -- configuration --------------------------------------------------------------------------

    def add_user(self, name: str, password: str) -> User:
        user = User(name, password)
        self.users[name] = user
        home = self.home(name)
        (home / "Maildir").mkdir(parents=True, exist_ok=True)
        self._chown_tree(home)
        rawlog = self.root / "rawlog" / name
        rawlog.mkdir(parents=True, exist_ok=True)
        self._chown_tree(rawlog)
        self._write_users()
        return user

    def add_master(self, name: str, password: str) -> User:
        self.masters[name] = User(name, password)
        self._write_users()
        return self.masters[name]

    def home(self, name: str) -> Path:
        return self.root / "home" / name

    def _write_users(self) -> None:
        lines = [
            f"{u.name}:{{PLAIN}}{u.password}:{self.uid}:{self.gid}::{self.home(u.name)}\n"
            for u in self.users.values()
        ]
        (self.root / "users").write_text("".join(lines))
        masters = [f"{u.name}:{{PLAIN}}{u.password}\n" for u in self.masters.values()]
        (self.root / "masterusers").write_text("".join(masters))

    def _chown_tree(self, path: Path) -> None:
        if os.geteuid() != 0:
            return
        for directory, _, files in os.walk(path):
            os.chown(directory, self.uid, self.gid)
            for name in files:
                os.chown(os.path.join(directory, name), self.uid, self.gid)

    def _ssl_settings(self) -> str:
        if self.ssl_cert is None:
            return "ssl = no"
        mode = "required" if self.ssl_required else "yes"
        settings = f"ssl = {mode}\nssl_cert = <{self.ssl_cert}\nssl_key = <{self.ssl_key}"
        if self.ssl_client_ca is not None:  # trustme's CA publishes no CRL
            settings += (
                f"\nssl_ca = <{self.ssl_client_ca}\nssl_verify_client_cert = yes"
                "\nssl_require_crl = no\nauth_ssl_require_client_cert = yes"
            )
        return settings

    def write_config(self) -> None:
        for sub in ("run", "state", "home", "rawlog"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        rawlog_dir = self.root / "rawlog" / "%u" if self.rawlog else ""
        internal = "dovecot" if os.geteuid() == 0 else _current_user()
        login = "dovenull" if os.geteuid() == 0 else _current_user()
        self.config_path.write_text(
            BASE_CONFIG.format(
                root=self.root,
                instance=self.instance_name,
                listen=self.listen,
                port=self.port,
                imaps_port=self.imaps_port,
                imaps_ssl="yes" if self.ssl_cert else "no",
                ssl=self._ssl_settings(),
                uid=self.uid,
                gid=self.gid,
                internal_user=internal,
                login_user=login,
                max_userip=100000,
                auth_failure_delay="0" if not self.fast else "2 secs",
                rawlog_dir=rawlog_dir,
                login_tuning=FAST_LOGIN if self.fast else "",
                imap_tuning=FAST_IMAP if self.fast else "",
                client_limit=self.client_limit,
                login_trusted_networks=self.login_trusted_networks,
                process_limit=max(1000, self.client_limit) if self.fast else 100,
            )
        )
        self._write_users()

    # -- running --------------------------------------------------------------------------------

    def start(self) -> DovecotInstance:
        self.write_config()
        self.process = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            wait_for_port(self.host, self.port)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"dovecot did not start: {self.log_text()}") from None
        return self

    @property
    def instance_name(self) -> str:
        return f"ipxtest{self.port}"

    def stop(self) -> None:
        """Stop the master and every process of this instance (``doveadm stop`` shuts the
        clients down with ``* BYE``; a plain SIGTERM to ``dovecot -F`` would orphan them)."""
        if self.process is None:
            return
        subprocess.run(
            [DOVEADM, "-c", str(self.config_path), "stop"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        reap(self.process)
        self.process = None
        self._kill_leftovers()

    def _kill_leftovers(self) -> None:
        marker = f"dovecot-{self.instance_name}/".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if (entry / "cmdline").read_bytes().startswith(marker):
                    os.kill(int(entry.name), signal.SIGKILL)
            except OSError:
                continue

    def restart(self) -> None:
        self.stop()
        self.start()

    def doveadm(self, *args: str, input: bytes | None = None) -> str:
        result = subprocess.run(
            [DOVEADM, "-c", str(self.config_path), *args],
            input=input,
            capture_output=True,
            check=True,
            timeout=60,
        )
        return result.stdout.decode()

    def deliver(self, user: str, message: bytes, mailbox: str = "INBOX") -> None:
        """Deliver a message the way a mail server would (doveadm save)."""
        self.doveadm("save", "-u", user, "-m", mailbox, input=message)

    def deliver_many(self, user: str, messages: Iterable[bytes]) -> None:
        for message in messages:
            self.deliver(user, message)

    def log_text(self) -> str:
        parts = []
        for name in ("dovecot.log", "dovecot.info.log"):
            path = self.root / name
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)

    def logins(self, user: str) -> int:
        """How many times ``user`` logged in to this Dovecot (one per backend session)."""
        return len(re.findall(rf"Login: user=<{re.escape(user)}>", self.log_text()))

    def logouts(self, user: str) -> int:
        return len(re.findall(rf"imap\({re.escape(user)}\).*Logged out", self.log_text()))

    def rawlog_text(self, user: str) -> str:
        directory = self.root / "rawlog" / user
        if not directory.exists():
            return ""
        return "".join(p.read_text(errors="replace") for p in sorted(directory.glob("*.in")))


def _current_user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def make_message(
    subject: str, body: str = "Hello.\r\n", sender: str = "sender@example.org", size: int = 0
) -> bytes:
    """An RFC 5322 message; ``size`` pads the body to about that many bytes."""
    header = (
        f"From: {sender}\r\nTo: user@example.org\r\nSubject: {subject}\r\n"
        f"Date: Sat, 21 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{abs(hash(subject))}@x>\r\n\r\n"
    )
    text = body
    if size > len(header) + len(body):
        line = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+/0123456789\r\n"
        text += line * ((size - len(header) - len(body)) // len(line))
    return (header + text).encode()


@contextlib.contextmanager
def running_dovecot(
    users: Mapping[str, str],
    *,
    masters: Mapping[str, str] | None = None,
    prefix: str = "ipx-dovecot-",
    **options: Any,
) -> Iterator[DovecotInstance]:
    """A private Dovecot with these users (name: password), stopped and removed at the end.

    Its directory is not under pytest's ``tmp_path``, whose parents are mode 0700: Dovecot's
    mail user must get in.
    """
    root = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(root, 0o755)
    instance = DovecotInstance(root, **options)
    try:
        instance.write_config()
        for name, password in users.items():
            instance.add_user(name, password)
        for name, password in (masters or {}).items():
            instance.add_master(name, password)
        yield instance.start()
    finally:
        instance.stop()
        shutil.rmtree(root, ignore_errors=True)

"""A private PostgreSQL on loopback: ``initdb`` in a temp dir, run as an unprivileged user.

PostgreSQL refuses to run as root; as root the cluster belongs to Debian's ``postgres`` user
and its commands run through ``runuser``. The superuser ``postgres`` and the role the proxy
uses (``imapproxy``) log in over TCP with SCRAM passwords; the socket lives in the temp dir.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.support.dovecot import free_port, wait_for_port
from tests.support.polling import wait_until
from tests.support.processes import reap

BINDIR = (
    Path(sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1])
    if glob.glob("/usr/lib/postgresql/*/bin")
    else Path("/usr/bin")
)
SUPERUSER_PASSWORD = "pg-super-pw"
PROXY_ROLE, PROXY_PASSWORD = "imapproxy", "pg-proxy-pw"
DATABASE = "routes"


class Postgres:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.owner = "postgres" if os.geteuid() == 0 else None

    def _as_owner(self, *command: str) -> list[str]:
        return ["runuser", "-u", self.owner, "--", *command] if self.owner else list(command)

    def init(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(SUPERUSER_PASSWORD + "\n")
        if self.owner:
            user = pwd.getpwnam(self.owner)
            os.chown(self.root, user.pw_uid, user.pw_gid)
            os.chown(pwfile, user.pw_uid, user.pw_gid)
        subprocess.run(
            self._as_owner(
                str(BINDIR / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--pwfile",
                str(pwfile),
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ),
            capture_output=True,
            check=True,
            timeout=120,
        )

    def start(self) -> Postgres:
        self.process = subprocess.Popen(
            self._as_owner(
                str(BINDIR / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-h",
                "127.0.0.1",
                "-k",
                str(self.root),
                "-c",
                "fsync=off",
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port("127.0.0.1", self.port, timeout=60)
        except TimeoutError:
            self.stop()
            raise RuntimeError("postgres did not start") from None
        # listening is not serving: "the database system is starting up" comes first
        if not wait_until(self._answers, timeout=60):
            self.stop()
            raise RuntimeError("postgres does not answer")
        return self

    def _answers(self) -> bool:
        import psycopg

        try:
            with self.superuser() as db:
                db.execute("SELECT 1")
        except psycopg.OperationalError:
            return False
        return True

    def stop(self) -> None:
        """A fast shutdown (SIGINT): clients are disconnected at once."""
        if self.process is None:
            return
        pid = _postmaster_pid(self.data)
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 2)
        reap(self.process, timeout_s=30)
        self.process = None

    def url(self, user: str = PROXY_ROLE, password: str = PROXY_PASSWORD) -> str:
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{DATABASE}"

    def superuser(self, database: str = "postgres") -> Any:
        import psycopg

        return psycopg.connect(
            f"postgresql://postgres:{SUPERUSER_PASSWORD}@127.0.0.1:{self.port}/{database}",
            autocommit=True,
        )


def _postmaster_pid(data: Path) -> int | None:
    try:
        return int((data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def running_postgres() -> Iterator[Postgres]:
    root = Path(tempfile.mkdtemp(prefix="ipx-postgres-"))
    server = Postgres(root)
    try:
        server.init()
        server.start()
        with server.superuser() as db:
            db.execute(f"CREATE ROLE {PROXY_ROLE} LOGIN PASSWORD '{PROXY_PASSWORD}'")
            db.execute(f"CREATE DATABASE {DATABASE} OWNER postgres")
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)

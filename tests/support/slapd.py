"""A private OpenLDAP ``slapd`` on loopback: its own config, schema and database in a temp dir.

The schema adds ``mailHost`` (a server, ``HOST[:PORT]``) and the auxiliary class
``mailRoutedObject`` that carries it, under an OID arc kept for examples. Entries are
``uid=NAME,ou=people,dc=example,dc=com`` (inetOrgPerson); the root DN binds with a password.
As root, slapd runs as the ``openldap`` user (``-u``/``-g``), as Debian runs it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from tests.support.dovecot import free_port, wait_for_port
from tests.support.processes import terminate

SLAPD = shutil.which("slapd") or "/usr/sbin/slapd"
LDAPADD = shutil.which("ldapadd") or "/usr/bin/ldapadd"
SCHEMA_DIR = Path("/etc/ldap/schema")
BASE_DN = "dc=example,dc=com"
PEOPLE_DN = f"ou=people,{BASE_DN}"
ROOT_DN = f"cn=admin,{BASE_DN}"
ROOT_PASSWORD = "ldap-admin-pw"

MAIL_SCHEMA = """\
attributetype ( 1.3.6.1.4.1.32473.1.1.1 NAME 'mailHost'
    DESC 'the IMAP server of this account: HOST[:PORT]'
    EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.15{256} SINGLE-VALUE )
objectclass ( 1.3.6.1.4.1.32473.1.2.1 NAME 'mailRoutedObject' SUP top AUXILIARY
    MAY ( mailHost ) )
"""

SLAPD_CONF = """\
include {schema}/core.schema
include {schema}/cosine.schema
include {schema}/inetorgperson.schema
include {root}/mail.schema
pidfile {root}/slapd.pid
argsfile {root}/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
database mdb
maxsize 10485760
suffix "{base}"
rootdn "{rootdn}"
rootpw {rootpw}
directory {root}/db
index uid eq
"""


class Slapd:
    """``ldap://127.0.0.1:PORT``, and with ``tls`` (certificate, key) ``ldaps://127.0.0.2:PORT``."""

    def __init__(self, root: Path, tls: tuple[Path, Path] | None = None) -> None:
        self.root = root
        self.port = free_port()
        self.tls = tls
        self.tls_port = free_port("127.0.0.2") if tls else None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def tls_uri(self) -> str:
        return f"ldaps://127.0.0.2:{self.tls_port}"

    def _urls(self) -> str:
        return f"{self.uri}/ {self.tls_uri}/" if self.tls else f"{self.uri}/"

    def write_config(self) -> None:
        (self.root / "db").mkdir(exist_ok=True)
        (self.root / "mail.schema").write_text(MAIL_SCHEMA)
        conf = SLAPD_CONF.format(
            schema=SCHEMA_DIR, root=self.root, base=BASE_DN, rootdn=ROOT_DN, rootpw=ROOT_PASSWORD
        )
        if self.tls:  # global settings: before "database"
            cert, key = self.tls
            tls = f"TLSCertificateFile {cert}\nTLSCertificateKeyFile {key}\n"
            conf = conf.replace("database mdb\n", tls + "database mdb\n")
        (self.root / "slapd.conf").write_text(conf)
        if os.geteuid() == 0:
            user = pwd.getpwnam("openldap")
            for path in (self.root, self.root / "db"):
                os.chown(path, user.pw_uid, user.pw_gid)

    def start(self) -> Slapd:
        identity = ["-u", "openldap", "-g", "openldap"] if os.geteuid() == 0 else []
        self.process = subprocess.Popen(
            [SLAPD, "-d", "0", "-f", str(self.root / "slapd.conf"), "-h", self._urls(), *identity],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            wait_for_port("127.0.0.1", self.port)
        except TimeoutError:
            self.stop()
            raise RuntimeError("slapd did not start") from None
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        terminate(self.process)
        self.process = None

    def add(self, ldif: str) -> None:
        subprocess.run(
            [LDAPADD, "-x", "-H", self.uri, "-D", ROOT_DN, "-w", ROOT_PASSWORD],
            input=ldif.encode(),
            capture_output=True,
            check=True,
            timeout=30,
        )

    def add_people(self, hosts: Mapping[str, str | None]) -> None:
        """``uid=NAME`` entries, with ``mailHost`` when the host is not None."""
        entries = [
            f"dn: {BASE_DN}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n",
            f"dn: {PEOPLE_DN}\nobjectClass: organizationalUnit\nou: people\n",
        ]
        for name, host in hosts.items():
            entry = (
                f"dn: uid={name},{PEOPLE_DN}\nobjectClass: inetOrgPerson\n"
                f"objectClass: mailRoutedObject\nuid: {name}\ncn: {name}\nsn: {name}\n"
                f"mail: {name}@example.com\n"
            )
            entries.append(entry + (f"mailHost: {host}\n" if host else ""))
        self.add("\n".join(entries))


@contextlib.contextmanager
def running_slapd(tls: tuple[Path, Path] | None = None) -> Iterator[Slapd]:
    root = Path(tempfile.mkdtemp(prefix="ipx-slapd-"))
    os.chmod(root, 0o755)
    server = Slapd(root, tls)
    try:
        server.write_config()
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)

"""Client credentials and the keyed hash that stands for a password in the connection cache.

The cache never holds a password: only ``HMAC-SHA256(key, user NUL password)`` with a key drawn
at random for each process, compared with ``hmac.compare_digest``. A ``Credentials`` object lives
from the client's LOGIN to the end of the backend login and then goes; its ``repr`` masks the
password so that no traceback or log line can show it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field

# up-imapproxy's MAXUSERNAMELEN and MAXPASSWDLEN (imapproxy.h).
MAX_USERNAME_BYTES = 256
MAX_PASSWORD_BYTES = 8192


@dataclass(frozen=True, slots=True)
class Credentials:
    """A user name and password as decoded from LOGIN or AUTHENTICATE (exact bytes)."""

    username: bytes
    password: bytes = field(repr=False)
    mechanism: str = "LOGIN"  # how the client logged in: LOGIN, PLAIN or AUTH-LOGIN

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password=<hidden>)"

    @property
    def username_text(self) -> str:
        """The user name for logs (undecodable bytes escaped, never raising)."""
        return self.username.decode("utf-8", "backslashreplace")


class CredentialHasher:
    """Keyed hash of credentials; the key exists only in this process's memory (and in its
    successor's, which adopts it with the cached sessions: ``session_transfer``)."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else os.urandom(32)
        # keyed once: a copy per digest skips OpenSSL's look-up of the digest and the key's
        # set-up, which cost 8-20 µs per call on a page's cold caches (hmac.digest: 1.5 warm)
        self._keyed = hmac.new(self._key, digestmod=hashlib.sha256)

    @property
    def key(self) -> bytes:
        return self._key

    def digest(self, credentials: Credentials) -> bytes:
        message = credentials.username + b"\x00" + credentials.password
        keyed = self._keyed.copy()
        keyed.update(message)
        return keyed.digest()


def same_digest(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)

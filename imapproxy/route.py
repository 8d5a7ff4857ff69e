"""Routes: which IMAP server a login goes to, the ``route_map`` file, the answer cache.

Sans-I/O: no sockets, no clock (callers pass ``now``), no files (callers pass lines).

A ``Route`` is where one login's sessions live: the server (host, port), how to reach it
(``tls``: clear, STARTTLS or implicit TLS, verified with the ``tls_*`` settings of the default
server; ``None`` keeps the default server's own choice, ``server_tls``/``force_tls``),
optionally the login name to use there (``destuser``, Dovecot's passdb field of that name) and a
connect timeout of its own. Routes are values: two equal routes are the same server, and the
connection cache keys sessions by route, so a user whose route changed never gets a session
opened on the old one.

The ``route_map`` file: one route a line, ``KEY HOST[:PORT] [option=value ...]``, ``#`` starts a
comment, where KEY is a full login name (``alice@example.com``), a bare name (``alice``: the
local part of any login, or a login without a domain), a domain (``@example.com``) or ``*``.
The most specific key wins: full login, then bare name, then domain, then ``*``. Options:
``tls=clear|starttls|implicit``, ``destuser=NAME``, ``connect_timeout=SECONDS``. A bracketed
IPv6 address takes a port after the bracket (``[::1]:143``). Errors name file and line
(``ConfigError``), as the configuration's do.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

from imapproxy.errors import ConfigError

DEFAULT_IMAP_PORT = 143  # RFC 9051 §1
DEFAULT_IMAPS_PORT = 993  # RFC 8314 §7.3
MAX_HOST_BYTES = 253  # RFC 1035 §2.3.4, the longest name a route can give
# Sources may answer with a login name for the server; up-imapproxy's MAXUSERNAMELEN bounds it.
MAX_DESTUSER_BYTES = 256
CACHE_ENTRIES_MAX = 100_000  # route answers kept at most (oldest dropped first)


class RouteError(Exception):
    """A source's answer cannot be used (bad host, port, option); the detail is for the log."""


class RouteUnavailable(Exception):
    """The source could not answer (down, timed out, bad answer): the client gets
    ``NO [UNAVAILABLE]`` and the log gets this detail."""


class RouteDenied(Exception):
    """The source refused the login (an auth_http ``Auth-Status`` other than OK): ``text`` is
    the reason for the client's ``NO``, after ``wait_s`` seconds (``Auth-Wait``)."""

    def __init__(self, text: str, wait_s: float) -> None:
        super().__init__(text)
        self.text, self.wait_s = text, wait_s


@dataclass(frozen=True)
class RouteRequest:
    """What a source may know of a login: never logged whole (the password is masked)."""

    username: str  # the login name, valid UTF-8 without NUL (others are never looked up)
    password: bytes = field(repr=False)
    mechanism: str  # LOGIN, PLAIN or AUTH-LOGIN, as the client logged in
    client_ip: str


class RouteSource(Protocol):
    """A place that knows routes. ``blocking`` sources run in a thread, under a time-out."""

    name: str
    blocking: bool

    def lookup(self, request: RouteRequest) -> Route | None: ...

    def close(self) -> None: ...


class TLSMode(enum.Enum):
    CLEAR = "clear"
    STARTTLS = "starttls"
    IMPLICIT = "implicit"


@dataclass(frozen=True)
class Route:
    """Where a login's sessions go."""

    host: str
    port: int = DEFAULT_IMAP_PORT
    tls: TLSMode | None = None  # None: as the default server (server_tls, force_tls)
    destuser: bytes | None = None  # the login name at the server, if not the client's
    connect_timeout: int | None = None  # seconds; None: server_connect_timeout

    @property
    def name(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def target(self) -> Route:
        """The server alone, without the login name: one ``Backend`` serves each target."""
        return replace(self, destuser=None)


def parse_tls(value: str) -> TLSMode:
    try:
        return TLSMode(value.strip().lower())
    except ValueError:
        raise RouteError(f'tls: expected clear, starttls or implicit, got "{value}"') from None


def parse_port(value: str | int) -> int:
    text = str(value).strip()
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise RouteError(f'expected a port number from 1 to 65535, got "{text}"')
    return int(text)


def parse_timeout(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise RouteError(f'connect_timeout: expected a positive integer, got "{value}"')
    return int(value)


def check_host(host: str) -> str:
    """A host name or address as a source gave it: no spaces, controls or separators."""
    if not host or len(host.encode("utf-8", "surrogateescape")) > MAX_HOST_BYTES:
        raise RouteError("host: empty or too long")
    if any(c.isspace() or ord(c) < 0x21 or c in "/@[]\\" for c in host):
        raise RouteError(f'host: not a host name or address: "{host!r}"')
    return host


def check_destuser(name: bytes) -> bytes:
    """A login name for the server: sent as an IMAP string, so no NUL, CR or LF in it."""
    if not name or len(name) > MAX_DESTUSER_BYTES or any(b in name for b in b"\x00\r\n"):
        raise RouteError("destuser: empty, too long, or with NUL, CR or LF")
    return name


def split_host_port(text: str, default_port: int | None = None) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port``; a bare IPv6 address has no port."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise RouteError(f'bad bracketed address "{text}"')
        return check_host(host), parse_port(rest[1:]) if rest else default_port
    if text.count(":") == 1:
        host, port = text.split(":")
        return check_host(host), parse_port(port)
    return check_host(text), default_port


def make_route(
    host_port: str,
    *,
    port: str | int | None = None,
    tls: str | None = None,
    destuser: str | bytes | None = None,
    connect_timeout: str | None = None,
) -> Route:
    """A ``Route`` from a source's text fields, each checked (``RouteError`` otherwise)."""
    mode = parse_tls(tls) if tls else None
    host, given_port = split_host_port(host_port.strip())
    if port not in (None, ""):
        given_port = parse_port(port)
    if given_port is None:
        given_port = DEFAULT_IMAPS_PORT if mode is TLSMode.IMPLICIT else DEFAULT_IMAP_PORT
    user = destuser.encode("utf-8", "surrogateescape") if isinstance(destuser, str) else destuser
    return Route(
        host,
        given_port,
        mode,
        check_destuser(user) if user else None,
        parse_timeout(connect_timeout) if connect_timeout else None,
    )


# -- the route_map file ---------------------------------------------------------------------------

_OPTIONS = ("tls", "destuser", "connect_timeout")


class RouteMap:
    """The parsed ``route_map`` file: lookups by most specific key."""

    def __init__(self, entries: Mapping[str, Route]) -> None:
        self.entries = dict(entries)

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, username: bytes) -> Route | None:
        """The route of the most specific key matching ``username``, or None."""
        for key in candidate_keys(username):
            route = self.entries.get(key)
            if route is not None:
                return route
        return None


def candidate_keys(username: bytes) -> list[str]:
    """Keys that could match a login, most specific first: full, bare name, @domain, *.

    Keys are compared case-insensitively (IMAP servers mostly treat names so; the file's
    author writes them as they like). A name that is not UTF-8 matches only ``*``.
    """
    try:
        full = username.decode("utf-8").lower()
    except UnicodeDecodeError:
        return ["*"]
    local, at, domain = full.rpartition("@")
    if not at:
        return [full, "*"]
    return [full, local, "@" + domain, "*"]


def parse_route_map(lines: Iterable[str], path: str) -> RouteMap:
    """Parse the file's lines; the first problem raises ``ConfigError(path, line, key)``."""
    entries: dict[str, Route] = {}
    for lineno, raw in enumerate(lines, start=1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        key = words[0].lower()
        if key in entries:
            raise ConfigError(path, lineno, words[0], "a second route for this key")
        if len(words) < 2:
            raise ConfigError(path, lineno, words[0], "expected KEY HOST[:PORT] [option=value]")
        try:
            entries[_check_key(key)] = make_route(words[1], **_options(words[2:]))
        except RouteError as error:
            raise ConfigError(path, lineno, words[0], str(error)) from None
    return RouteMap(entries)


def _check_key(key: str) -> str:
    if key == "*" or (key.startswith("@") and len(key) > 1 and "@" not in key[1:]):
        return key
    if "*" in key or key.startswith("@"):
        raise RouteError("a key is a login name, a bare name, @domain or *")
    return key


def _options(words: list[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    for word in words:
        name, equals, value = word.partition("=")
        if not equals or name.lower() not in _OPTIONS or not value:
            raise RouteError(f'unknown option "{word}" (known: {", ".join(_OPTIONS)})')
        options[name.lower()] = value
    return options


# -- the answer cache ----------------------------------------------------------------------------


class RouteCache:
    """Answers of a slow source, kept ``ttl`` seconds (0: not kept), keyed as the caller likes.

    Only answers are kept (a route, or "no route"); failures never are, so that a source that
    comes back is asked again at once. Bounded: the oldest entries go first.
    """

    def __init__(self, ttl: float, max_entries: int = CACHE_ENTRIES_MAX) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[object, tuple[float, Route | None]] = OrderedDict()

    def get(self, key: object, now: float) -> tuple[bool, Route | None]:
        """(found, route); an entry whose time is up is dropped."""
        entry = self._entries.get(key)
        if entry is None:
            return False, None
        if entry[0] <= now:
            del self._entries[key]
            return False, None
        return True, entry[1]

    def put(self, key: object, route: Route | None, now: float) -> None:
        if self.ttl <= 0:
            return
        self._entries.pop(key, None)
        self._entries[key] = (now + self.ttl, route)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


# -- login names in queries ----------------------------------------------------------------------


def name_parts(username: bytes) -> dict[str, str]:
    """``%u``, ``%n``, ``%d`` of a login: the name, its local part, its domain (Dovecot's
    variables of those letters). Undecodable bytes are kept as surrogates for the caller's
    escaping, never dropped, so two names never look alike."""
    full = username.decode("utf-8", "surrogateescape")
    local, at, domain = full.rpartition("@")
    return {"u": full, "n": local if at else full, "d": domain if at else ""}


def ldap_escape(value: str) -> str:
    """A value for an LDAP search filter, escaped per RFC 4515 §3: ``*``, ``(``, ``)``, ``\\``
    and NUL as ``\\XX``; other bytes outside printable ASCII too, as their UTF-8 bytes."""
    out = []
    for byte in value.encode("utf-8", "surrogateescape"):
        if byte in b"*()\\" or byte < 0x20 or byte >= 0x7F:
            out.append(f"\\{byte:02x}")
        else:
            out.append(chr(byte))
    return "".join(out)


def expand_filter(template: str, username: bytes) -> str:
    """``route_ldap_filter`` with ``%u``, ``%n``, ``%d`` replaced by escaped values, ``%%``
    by ``%``; any other ``%`` sequence is left out (``check_filter`` refuses it at start-up)."""
    parts = {key: ldap_escape(value) for key, value in name_parts(username).items()}
    out, index = [], 0
    while index < len(template):
        char = template[index]
        if char == "%" and index + 1 < len(template):
            letter = template[index + 1]
            out.append("%" if letter == "%" else parts.get(letter, ""))
            index += 2
        else:
            out.append(char)
            index += 1
    return "".join(out)


def check_filter(template: str) -> str:
    """A ``route_ldap_filter``: in parentheses, and only ``%u``, ``%n``, ``%d``, ``%%``."""
    if not (template.startswith("(") and template.endswith(")")):
        raise ValueError("expected a filter in parentheses, such as (mail=%u)")
    index = template.find("%")
    while index != -1:
        if template[index + 1 : index + 2] not in ("u", "n", "d", "%"):
            raise ValueError("only %u, %n, %d and %% may follow a %")
        index = template.find("%", index + 2)
    return template

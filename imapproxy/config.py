"""The configuration: up-imapproxy's ``imapproxy.conf``, same keys, same meaning, checked strictly.

One declarative table: every setting is a field of ``Config`` whose metadata holds its
parser, its file key (attribute names keep up-imapproxy's key names verbatim, except that the
dot of ``tls_no_tlsv1.1`` becomes ``_``) and a one-line description. Defaults are the documented
ones (up-imapproxy's shipped ``imapproxy.conf`` and README), not its accidental zeros.

File syntax, as up-imapproxy reads it: one ``keyword value`` per line, keyword case-insensitive,
``#`` starts a comment anywhere on a line (so no value can contain ``#``), key and value
separated by spaces or tabs, the value being the rest of the line. Unlike up-imapproxy, an
unknown key, a malformed number or an impossible value is an error naming file and line
(``ConfigError``), and the program exits with status 78 (``EX_CONFIG``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from imapproxy.errors import ConfigError
from imapproxy.route import check_filter

EX_CONFIG = 78  # sysexits.h

DEFAULT_CONFIG_PATH = "/etc/imapproxy.conf"

Parser = Callable[[str], Any]


def _quoted(value: str) -> str:
    return '"' + value + '"'


def string(value: str) -> str | None:
    return value or None


def boolean(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("yes", "true", "y"):
        return True
    if lowered in ("no", "false", "n"):
        return False
    raise ValueError(f"expected yes or no, got {_quoted(value)}")


def _integer(value: str, minimum: int, what: str) -> int:
    try:
        number = int(value, 10)
    except ValueError:
        raise ValueError(f"expected {what}, got {_quoted(value)}") from None
    if number < minimum:
        raise ValueError(f"expected {what}, got {_quoted(value)}")
    return number


def positive_int(value: str) -> int:
    return _integer(value, 1, "a positive integer")


def non_negative_int(value: str) -> int:
    return _integer(value, 0, "a non-negative integer")


def port(value: str) -> int:
    """A TCP port number, or a service name from /etc/services as getaddrinfo takes."""
    if not value.isdigit():
        try:
            return socket.getservbyname(value, "tcp")
        except OSError:
            raise ValueError(
                f"expected a port number or service name, got {_quoted(value)}"
            ) from None
    number = int(value)
    if not 1 <= number <= 65535:
        raise ValueError(f"expected a port number from 1 to 65535, got {_quoted(value)}")
    return number


SYSLOG_FACILITIES = tuple(
    ["LOG_USER", "LOG_MAIL", "LOG_DAEMON", "LOG_AUTH", "LOG_LPR", "LOG_NEWS", "LOG_UUCP"]
    + ["LOG_CRON", "LOG_AUTHPRIV", "LOG_SYSLOG", "LOG_FTP"]
    + [f"LOG_LOCAL{n}" for n in range(8)]
)
SYSLOG_PRIORITIES = (
    "LOG_EMERG",
    "LOG_ALERT",
    "LOG_CRIT",
    "LOG_ERR",
    "LOG_WARNING",
    "LOG_NOTICE",
    "LOG_INFO",
    "LOG_DEBUG",
)


def _one_of(choices: tuple[str, ...], what: str) -> Parser:
    def parse(value: str) -> str:
        if value.upper() in choices:
            return value.upper()
        raise ValueError(f"expected {what} ({', '.join(choices)}), got {_quoted(value)}")

    return parse


syslog_facility = _one_of(SYSLOG_FACILITIES, "a syslog facility")
syslog_priority = _one_of(SYSLOG_PRIORITIES, "a syslog priority")


def ip_version(value: str) -> int:
    if value in ("4", "6"):
        return int(value)
    raise ValueError(f"expected 4 or 6, got {_quoted(value)}")


def sasl_mech(value: str) -> str:
    if value.lower() in ("plain", "login"):
        return value.lower()
    raise ValueError(f'expected "plain" or "login", got {_quoted(value)}')


TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")


def tls_version(value: str) -> str:
    for name in TLS_VERSIONS:
        if value.upper() == name.upper():
            return name
    raise ValueError(f"expected one of {', '.join(TLS_VERSIONS)}, got {_quoted(value)}")


def host_list(value: str) -> tuple[str, ...]:
    return tuple(value.split())


def host_port(value: str) -> tuple[str, int]:
    """``ADDRESS:PORT``, ``[IPV6]:PORT`` or ``NAME:PORT``."""
    host, colon, number = value.rpartition(":")
    if not colon or not host or not number.isdigit():
        raise ValueError(f"expected ADDRESS:PORT, got {_quoted(value)}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"expected [IPV6]:PORT for an IPv6 address, got {_quoted(value)}")
    return host, port(number)


def network_list(value: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for item in value.replace(",", " ").split():
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"expected addresses or networks, got {_quoted(item)}") from None
    return tuple(networks)


def in_networks(host: str, networks: tuple[Any, ...]) -> bool:
    """Whether the address ``host`` (text, maybe with a ``%zone``) is in one of ``networks``;
    an IPv4-mapped IPv6 address counts as its IPv4 address."""
    if not networks:  # the common case, on every connection: spare the parse
        return False
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def worker_count(value: str) -> int:
    """``workers``: a number from 1, or ``auto``, 0 in the frozen config (one per core, as
    nginx's ``worker_processes auto``; ``supervisor.worker_count`` resolves it)."""
    if value.lower() == "auto":
        return 0
    number = positive_int(value)
    if number > MAX_WORKERS:
        raise ValueError(f"expected at most {MAX_WORKERS} workers, got {number}")
    return number


MAX_WORKERS = 256  # far beyond any core count a proxy host has; bounds the stats file


def ldap_filter(value: str) -> str:
    return check_filter(value.strip())


SQL_SCHEMES = ("sqlite:///", "postgresql://", "postgres://")


def sql_url(value: str) -> str:
    if not value.startswith(SQL_SCHEMES) or value in SQL_SCHEMES:
        raise ValueError("expected sqlite:///PATH or postgresql://... (a libpq URI)")
    return value


def http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError(f"expected an http:// or https:// URL, got {_quoted(value)}")
    return value


def setting(
    default: Any,
    parse: Parser,
    doc: str,
    *,
    key: str | None = None,
    secret: bool = False,
    restart: bool = False,
) -> Any:
    """A ``Config`` field: its default, parser, description, (if not its name) file key;
    ``secret``: masked by ``--check-config`` and left out of ``repr``; ``restart``: a SIGHUP
    cannot change it (it shapes sockets, files, identity or the cache's preallocation)."""
    metadata = {"parse": parse, "doc": doc, "key": key, "secret": secret, "restart": restart}
    return field(default=default, metadata=metadata, repr=not secret)


LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
BUILT_IN = "(built-in settings)"


@dataclass(frozen=True)
class Origin:
    """Where settings were read: the file, and the line of each key set in it, so that an error
    found later (a TLS file that cannot be loaded, at start-up or on SIGHUP) names its place."""

    path: str = BUILT_IN
    lines: Mapping[str, int] = field(default_factory=dict)

    def error(self, key: str, message: str) -> ConfigError:
        """``FILE:LINE: KEY: message`` (``FILE: KEY: ...`` for a key left at its default)."""
        return ConfigError(self.path, self.lines.get(key), key, message)


@dataclass(frozen=True)
class Config:
    """Effective settings. Field order is the order of ``--check-config`` output."""

    # -- up-imapproxy 1.2.8 keys ----------------------------------------------------------------
    server_hostname: str | None = setting(
        None, string, "IMAP server to proxy to (required)", restart=True
    )
    server_port: int = setting(143, port, "its port", restart=True)
    listen_address: tuple[str, ...] = setting(
        (), host_list, "addresses to listen on (all if unset)", restart=True
    )
    listen_port: int = setting(143, port, "port to listen on", restart=True)
    connect_retries: int = setting(10, non_negative_int, "start-up: extra rounds of connect tries")
    connect_delay: int = setting(5, non_negative_int, "start-up: seconds between rounds")
    cache_size: int = setting(
        3072, positive_int, "backend sessions, active plus cached", restart=True
    )
    cache_expiration_time: int = setting(
        300, non_negative_int, "seconds a logged-out session is kept"
    )
    proc_username: str | None = setting(None, string, "user to run as", restart=True)
    proc_groupname: str | None = setting(None, string, "group to run as", restart=True)
    stat_filename: str = setting(
        "/var/run/pimpstats", string, "mmap'd statistics file", restart=True
    )
    protocol_log_filename: str = setting(
        "/var/log/imapproxy_protocol.log",
        string,
        "protocol trace file (XPROXY_TRACE)",
        restart=True,
    )
    # restart: openlog() again would fail inside a chroot (no /dev/log there)
    syslog_facility: str = setting("LOG_MAIL", syslog_facility, "syslog facility", restart=True)
    syslog_prioritymask: str | None = setting(None, syslog_priority, "log up to this priority")
    send_tcp_keepalives: bool = setting(False, boolean, "SO_KEEPALIVE on all sockets", restart=True)
    enable_select_cache: bool = setting(False, boolean, "answer repeated SELECTs from a cache")
    foreground_mode: bool = setting(False, boolean, "do not detach", restart=True)
    force_tls: bool = setting(False, boolean, "always STARTTLS to the backend")
    chroot_directory: str | None = setting(None, string, "chroot here after start-up", restart=True)
    preauth_command: str | None = setting(None, string, "command sent before each backend login")
    enable_admin_commands: bool = setting(False, boolean, "allow the XPROXY_* commands")
    tls_ca_file: str | None = setting(None, string, "CA certificates to verify the backend")
    tls_ca_path: str | None = setting(None, string, "CA directory (hashed names)")
    tls_cert_file: str | None = setting(None, string, "client certificate for the backend")
    tls_key_file: str | None = setting(None, string, "its key (default: the certificate file)")
    tls_verify_server: bool = setting(False, boolean, "verify the backend's certificate and name")
    tls_ciphers: str | None = setting(None, string, "OpenSSL cipher list towards the backend")
    tls_no_tlsv1: bool = setting(False, boolean, "refuse TLS 1.0 to the backend")
    tls_no_tlsv1_1: bool = setting(False, boolean, "refuse TLS 1.1", key="tls_no_tlsv1.1")
    tls_no_tlsv1_2: bool = setting(False, boolean, "refuse TLS 1.2", key="tls_no_tlsv1.2")
    auth_sasl_plain_username: str | None = setting(None, string, "static SASL identity: user")
    auth_sasl_plain_password: str | None = setting(
        None, string, "static SASL identity: password", secret=True
    )
    auth_shared_secret: str | None = setting(
        None, string, "password clients give in that mode", secret=True
    )
    auth_sasl_mech: str | None = setting(None, sasl_mech, '"plain": AUTHENTICATE PLAIN to backend')
    dns_rr: bool = setting(False, boolean, "rotate through the backend's addresses")
    ipversion_only: int | None = setting(
        None, ip_version, "4 or 6: backend address family", restart=True
    )

    # -- keys imapproxy adds --------------------------------------------------------------------
    listen_backlog: int = setting(
        1024, positive_int, "listen queue length (up-imapproxy: 5)", restart=True
    )
    client_login_timeout: int = setting(60, positive_int, "seconds a client has to log in")
    client_idle_timeout: int = setting(1800, positive_int, "seconds of client silence after login")
    server_connect_timeout: int = setting(10, positive_int, "seconds to connect to the backend")
    server_response_timeout: int = setting(30, positive_int, "seconds to wait for a backend reply")
    shutdown_timeout: int = setting(10, non_negative_int, "seconds active clients get on SIGTERM")
    auth_failure_delay: int = setting(2, non_negative_int, "seconds a failed login's reply waits")
    server_tls: bool = setting(False, boolean, "implicit TLS to the backend (port 993)")
    client_tls_cert_file: str | None = setting(None, string, "certificate shown to clients")
    client_tls_key_file: str | None = setting(None, string, "its key (default: the cert file)")
    client_tls_chain_file: str | None = setting(None, string, "intermediate certificates")
    client_tls_ciphers: str | None = setting(None, string, "OpenSSL cipher list for clients")
    client_tls_min_version: str = setting("TLSv1.2", tls_version, "oldest TLS for clients")
    client_tls_port: int | None = setting(
        None, port, "implicit-TLS listener port (993)", restart=True
    )
    client_starttls: bool = setting(False, boolean, "offer STARTTLS to clients")
    client_tls_required: bool = setting(False, boolean, "no login before TLS (LOGINDISABLED)")
    admin_allow: tuple[Any, ...] = setting(LOOPBACK, network_list, "who may use XPROXY_* commands")
    max_client_connections: int = setting(
        0, non_negative_int, "clients served at once; 0: as the open-file limit allows"
    )
    workers: int = setting(
        1, worker_count, "worker processes (auto: one per core); 0 here means auto", restart=True
    )

    proxy_protocol_trusted_networks: tuple[Any, ...] = setting(
        (), network_list, "senders of a PROXY protocol header (HAProxy); empty: off"
    )
    forward_client_address: bool = setting(
        True, boolean, "tell the server the client's address (ID, as Dovecot's proxy)"
    )
    forward_trusted_networks: tuple[Any, ...] = setting(
        (), network_list, "clients whose ID may set x-originating-ip (webmail)"
    )
    reuse_same_client_address: bool = setting(
        False, boolean, "reuse a cached session only for the address it was opened for"
    )
    reuse_after_enable: bool = setting(
        False, boolean, "cache a session on which the client sent ENABLE (one webmail only)"
    )
    metrics_listen: tuple[str, int] | None = setting(
        None,
        host_port,
        "ADDRESS:PORT of the Prometheus /metrics endpoint; unset: off",
        restart=True,
    )
    metrics_allow: tuple[Any, ...] = setting(LOOPBACK, network_list, "who may scrape /metrics")
    takeover_socket: str | None = setting(
        None,
        string,
        "hand-over socket (--take-over, SIGUSR2); unset: PIDFILE.takeover, else "
        "STAT_FILENAME.takeover; none: off",
        restart=True,
    )

    # not a setting: where the others were read
    origin: Origin = field(default_factory=Origin, compare=False, repr=False)

    # -- routing: several IMAP servers (server_hostname is the default route) -------------------
    route_map: str | None = setting(None, string, "file: login name, @domain or * -> server")
    route_ldap_uri: str | None = setting(None, string, "LDAP server(s) to ask for routes")
    route_ldap_base: str | None = setting(None, string, "LDAP search base")
    route_ldap_filter: str = setting("(mail=%u)", ldap_filter, "LDAP filter; %u %n %d escaped")
    route_ldap_attribute: str = setting("mailHost", string, "LDAP attribute: HOST[:PORT]")
    route_ldap_bind_dn: str | None = setting(None, string, "LDAP bind DN (anonymous if unset)")
    route_ldap_bind_password: str | None = setting(None, string, "its password", secret=True)
    route_ldap_tls_ca_file: str | None = setting(None, string, "CAs for ldaps:// (else system)")
    route_sql_url: str | None = setting(
        None, sql_url, "sqlite:///PATH or postgresql://...", secret=True
    )
    route_sql_query: str | None = setting(None, string, "query with a bound login parameter")
    route_http_url: str | None = setting(None, http_url, "nginx auth_http style service")
    route_http_send_password: bool = setting(False, boolean, "send Auth-Pass to it")
    route_lookup_timeout: int = setting(5, positive_int, "seconds a route lookup may take")
    route_cache_ttl: int = setting(60, non_negative_int, "seconds a looked-up route is kept")
    server_down_after: int = setting(3, positive_int, "failures in a row that mark a server down")
    server_down_max_backoff: int = setting(
        60, positive_int, "seconds between probes of a down server, at most"
    )

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def file_key(spec: dataclasses.Field[Any]) -> str:
    return spec.metadata["key"] or spec.name


SETTINGS: dict[str, dataclasses.Field[Any]] = {
    file_key(f): f for f in dataclasses.fields(Config) if "parse" in f.metadata
}
SECRET_KEYS = frozenset(key for key, spec in SETTINGS.items() if spec.metadata["secret"])
RESTART_KEYS = frozenset(key for key, spec in SETTINGS.items() if spec.metadata["restart"])


def parse_lines(lines: Iterator[str], path: str) -> Config:
    """Build a ``Config`` from the lines of a file; raise ``ConfigError`` on the first problem."""
    values: dict[str, Any] = {}
    where: dict[str, int] = {}
    for lineno, raw in enumerate(lines, start=1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        parts = text.split(None, 1)
        key = parts[0].lower()
        spec = SETTINGS.get(key)
        if spec is None:
            raise _unknown_key(path, lineno, parts[0])
        try:
            values[spec.name] = spec.metadata["parse"](parts[1] if len(parts) > 1 else "")
        except ValueError as error:
            raise ConfigError(path, lineno, key, str(error)) from None
        where[key] = lineno
    config = Config(**values, origin=Origin(path, where))
    check(config)
    return config


def _unknown_key(path: str, lineno: int, word: str) -> ConfigError:
    """The error for a first word that is no key; only its key-like start is shown, since a
    line like ``auth_shared_secret=...`` would otherwise put the secret on the screen."""
    name = word[: len(word) - len(word.lstrip(_KEY_CHARACTERS))]
    if name == word:
        return ConfigError(path, lineno, word, "unknown key")
    return ConfigError(
        path, lineno, name or None, "not a key: key and value are separated by spaces or tabs"
    )


_KEY_CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_."


STATIC_IDENTITY_KEYS = (
    "auth_sasl_plain_username",
    "auth_sasl_plain_password",
    "auth_shared_secret",
)
ROUTE_SOURCE_KEYS = {
    "map": "route_map",
    "ldap": "route_ldap_uri",
    "sql": "route_sql_url",
    "http": "route_http_url",
}


def route_sources(config: Config) -> list[str]:
    return [name for name, key in ROUTE_SOURCE_KEYS.items() if getattr(config, key)]


def check(config: Config) -> None:
    """Rules across keys."""
    error = config.origin.error
    if not config.server_hostname and not route_sources(config):
        raise error("server_hostname", "required, but not set (nor any route_* source)")
    _check_routing(config)
    static = [
        config.auth_sasl_plain_username,
        config.auth_sasl_plain_password,
        config.auth_shared_secret,
    ]
    if any(static) and not all(static):
        first = next(key for key in STATIC_IDENTITY_KEYS if getattr(config, key))
        raise error(
            first,
            "auth_sasl_plain_username, auth_sasl_plain_password and auth_shared_secret "
            "must be set together",
        )
    if config.tls_key_file and not config.tls_cert_file:
        raise error("tls_key_file", "set, but tls_cert_file is not")
    client_tls = (
        "client_tls_port",
        "client_starttls",
        "client_tls_required",
        "client_tls_key_file",
        "client_tls_chain_file",
    )
    for key in client_tls:
        if getattr(config, key) and not config.client_tls_cert_file:
            raise error(key, "needs client_tls_cert_file")
    if config.client_tls_required and not (config.client_starttls or config.client_tls_port):
        raise error(
            "client_tls_required",
            "needs client_starttls or client_tls_port (clients could never log in)",
        )


def _check_routing(config: Config) -> None:
    error = config.origin.error
    sources = route_sources(config)
    if len(sources) > 1:
        keys = ", ".join(ROUTE_SOURCE_KEYS[name] for name in sources)
        raise error(ROUTE_SOURCE_KEYS[sources[1]], f"one route source, not {keys}")
    needs = {"route_ldap_uri": "route_ldap_base", "route_sql_url": "route_sql_query"}
    for key, other in needs.items():
        if getattr(config, key) and not getattr(config, other):
            raise error(other, f"required with {key}")
    if config.route_ldap_bind_password and not config.route_ldap_bind_dn:
        raise error("route_ldap_bind_password", "set, but route_ldap_bind_dn is not")


@dataclass(frozen=True)
class Reload:
    """What a SIGHUP does: the settings in effect afterwards, and what changed."""

    config: Config
    applied: tuple[str, ...]  # keys whose new value is now in effect
    needs_restart: tuple[str, ...]  # keys changed in the file but kept until a restart


def reload(running: Config, new: Config) -> Reload:
    """Merge a re-read file into the running settings."""
    applied, restart, changes = [], [], {}
    for key, spec in SETTINGS.items():
        old_value, new_value = getattr(running, spec.name), getattr(new, spec.name)
        if old_value == new_value:
            continue
        if key in RESTART_KEYS:
            restart.append(key)
        else:
            applied.append(key)
            changes[spec.name] = new_value
    return Reload(running.replace(origin=new.origin, **changes), tuple(applied), tuple(restart))


def load(path: str) -> Config:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as file:
            return parse_lines(iter(file), path)
    except OSError as error:
        raise ConfigError(path, None, None, f"cannot read: {error.strerror}") from None


def describe(config: Config) -> str:
    """``key value`` lines of every effective setting, secrets masked (``--check-config``)."""
    lines = []
    for key, spec in SETTINGS.items():
        value = getattr(config, spec.name)
        if key == "workers" and value == 0:
            value = "auto"
        lines.append(f"{key} {_format(value, masked=key in SECRET_KEYS)}".rstrip())
    return "\n".join(lines) + "\n"


def _format(value: Any, *, masked: bool) -> str:
    if value is None or value == ():
        return "(unset)"
    if masked:
        return "********"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):
        return f"[{value[0]}]:{value[1]}" if ":" in value[0] else f"{value[0]}:{value[1]}"
    if isinstance(value, tuple):
        return " ".join(str(item) for item in value)
    return str(value)

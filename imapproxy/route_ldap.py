"""The LDAP source: a route from an attribute of the user's entry (ldap3).

``route_ldap_filter`` (``%u``, ``%n``, ``%d``: the login, its local part, its domain, each
escaped per RFC 4515 §3 so that a name such as ``*)(uid=*`` is only ever a value) is searched
under ``route_ldap_base`` (whole subtree), and the first value of ``route_ldap_attribute``
(``HOST``, ``HOST:PORT`` or ``[v6]:PORT``, as Courier's ``mailhost`` and Dovecot's ``host``)
is the server. No entry, or an entry without the attribute: no route. Two entries: the
directory is ambiguous, and the lookup fails (as Dovecot's passdb does).

``route_ldap_uri`` is one URI or several separated by spaces (tried in order); ``ldaps://``
uses TLS, verified against ``route_ldap_tls_ca_file`` or the system's CAs, with the host name
checked. With ``route_ldap_bind_dn`` the connection binds with it and
``route_ldap_bind_password``, else anonymously.

ldap3 talks through blocking sockets, so lookups run in the router's thread pool, one
connection per thread, re-opened after an error; connect and receive are bounded by
``route_lookup_timeout``.
"""

from __future__ import annotations

import ssl
from typing import Any

import ldap3
import ldap3.strategy.sync  # imported on first use otherwise: it must come before the drop
from ldap3.core.exceptions import LDAPException

from imapproxy.config import Config
from imapproxy.route import Route, RouteError, RouteRequest, RouteUnavailable, expand_filter
from imapproxy.route import make_route as _make_route
from imapproxy.route_sql import Connections


class LdapSource:
    """Routes from a directory."""

    blocking = True

    def __init__(self, config: Config, timeout: float) -> None:
        assert config.route_ldap_uri and config.route_ldap_base
        self.uris = config.route_ldap_uri.split()
        self.base = config.route_ldap_base
        self.filter = config.route_ldap_filter
        self.attribute = config.route_ldap_attribute
        self.bind_dn, self.bind_password = (
            config.route_ldap_bind_dn,
            config.route_ldap_bind_password,
        )
        self.ca_file = config.route_ldap_tls_ca_file
        self.timeout = max(1, int(timeout))  # ldap3 packs it into SO_RCVTIMEO: an integer
        self.name = f"LDAP {' '.join(self.uris)}"
        self._connections = Connections(LDAPException)

    def _servers(self) -> Any:
        tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=self.ca_file)
        servers = [
            ldap3.Server(uri, connect_timeout=self.timeout, get_info=ldap3.NONE, tls=tls)
            for uri in self.uris
        ]
        return ldap3.ServerPool(servers, ldap3.FIRST, active=1, exhaust=False)

    def _connect(self) -> Any:
        connection = ldap3.Connection(
            self._servers(),
            user=self.bind_dn,
            password=self.bind_password,
            read_only=True,
            receive_timeout=self.timeout,
            raise_exceptions=True,
        )
        connection.bind()
        return connection

    def lookup(self, request: RouteRequest) -> Route | None:
        query = expand_filter(self.filter, request.username.encode("utf-8"))

        def search(connection: Any) -> list[dict[str, Any]]:
            connection.search(
                self.base, query, ldap3.SUBTREE, attributes=[self.attribute], size_limit=2
            )
            return [e for e in connection.response or () if e.get("type") == "searchResEntry"]

        try:
            entries = self._connections.run(self._connect, search)
        except LDAPException as error:
            if type(error).__name__ == "LDAPSizeLimitExceededResult":
                raise RouteUnavailable(f"{self.name}: several entries match") from None
            raise RouteUnavailable(f"{self.name}: {type(error).__name__}: {error}") from None
        if len(entries) > 1:
            raise RouteUnavailable(f"{self.name}: several entries match")
        return route_from_entry(entries[0] if entries else None, self.attribute, self.name)

    def close(self) -> None:
        self._connections.close_all()


def route_from_entry(entry: dict[str, Any] | None, attribute: str, name: str) -> Route | None:
    if entry is None:
        return None
    values = entry.get("attributes", {}).get(attribute)
    if isinstance(values, list):
        values = values[0] if values else None
    if not values:
        return None
    try:
        return _make_route(str(values))
    except RouteError as error:
        raise RouteUnavailable(f"{name}: unusable {attribute}: {error}") from None

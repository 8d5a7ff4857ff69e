"""The ``route_map`` source: routes from a text file, read at start-up and on SIGHUP.

The file's syntax and the lookup order are ``route.parse_route_map``'s. A lookup is a
dictionary look-up in memory: it never blocks and needs no cache.
"""

from __future__ import annotations

from imapproxy.errors import ConfigError
from imapproxy.route import Route, RouteMap, RouteRequest, parse_route_map


def load(path: str) -> RouteMap:
    """Parse the file; ``ConfigError`` (file and line) if it cannot be read or used."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as file:
            return parse_route_map(file, path)
    except OSError as error:
        raise ConfigError(path, None, "route_map", f"cannot read: {error.strerror}") from None


class MapSource:
    """Routes from the file ``path``."""

    blocking = False

    def __init__(self, path: str) -> None:
        self.name = f"route_map {path}"
        self.routes = load(path)

    def lookup(self, request: RouteRequest) -> Route | None:
        return self.routes.lookup(request.username.encode())

    def close(self) -> None:
        pass

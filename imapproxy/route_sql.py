"""The SQL sources: a route from one row of a query, SQLite (stdlib ``sqlite3``) or PostgreSQL
(psycopg 3).

The query takes the login name as bound parameters, never formatted into the text: SQLite's
``:user``, ``:name``, ``:domain``, PostgreSQL's ``%(user)s``, ``%(name)s``, ``%(domain)s``
(the login, its local part, its domain). The first row gives the route; its columns are taken by
name when the query names them ``host``, ``port``, ``destuser``, ``tls``, ``connect_timeout``,
else by position in that order (only ``host`` is required). No row: no route.

Both drivers block, so lookups run in a thread of the router's pool (``blocking``), under
``route_lookup_timeout``; each thread keeps its own connection (neither connection may be
shared between threads) and opens a new one after an error.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote

from imapproxy.route import (
    Route,
    RouteError,
    RouteRequest,
    RouteUnavailable,
    make_route,
    name_parts,
)

T = TypeVar("T")
COLUMNS = ("host", "port", "destuser", "tls", "connect_timeout")


def route_from_row(names: Sequence[str], row: Sequence[Any] | None) -> Route | None:
    """The route a row gives (``RouteUnavailable`` if it is not a usable one)."""
    if row is None:
        return None
    lowered = [name.lower() for name in names]
    if "host" in lowered:
        fields = {name: value for name, value in zip(lowered, row, strict=True) if name in COLUMNS}
    else:
        fields = dict(zip(COLUMNS, row, strict=False))
    text = {k: str(v) for k, v in fields.items() if v is not None and str(v) != ""}
    if "host" not in text:
        return None
    try:
        return make_route(text.pop("host"), **text)
    except RouteError as error:
        raise RouteUnavailable(f"unusable route in the database: {error}") from None


def parameters(request: RouteRequest) -> dict[str, str]:
    parts = name_parts(request.username.encode())
    return {"user": parts["u"], "name": parts["n"], "domain": parts["d"]}


class Connections:
    """One connection per thread of the pool (no driver here shares one between threads),
    all of them remembered so that ``close_all`` ends them.

    ``run`` uses this thread's connection; if a kept one fails (the server restarted since),
    it is closed and the query tried once more on a new one, so that a server that is back
    answers at once. A new connection that fails raises the driver's error.
    """

    def __init__(self, errors: type[Exception]) -> None:
        self._local = threading.local()
        self._every: list[Any] = []
        self._lock = threading.Lock()
        self._close_errors = self.errors = errors

    def run(self, connect: Callable[[], Any], use: Callable[[Any], T]) -> T:
        kept = getattr(self._local, "connection", None) is not None
        try:
            return use(self.get(connect))
        except self.errors:
            self.drop()
            if not kept:
                raise
        try:
            return use(self.get(connect))
        except self.errors:
            self.drop()
            raise

    def get(self, connect: Callable[[], Any]) -> Any:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = connect()
            with self._lock:
                self._every.append(connection)
        return connection

    def drop(self) -> None:
        """After an error: this thread's connection closed, a new one next time."""
        connection = getattr(self._local, "connection", None)
        self._local.connection = None
        if connection is not None:
            with self._lock:
                if connection in self._every:
                    self._every.remove(connection)
            self._close(connection)

    def close_all(self) -> None:
        with self._lock:
            every, self._every = self._every, []
        for connection in every:
            self._close(connection)

    def _close(self, connection: Any) -> None:
        # sqlite3 refuses a close from another thread; the garbage collector frees it then
        with contextlib.suppress(self._close_errors):
            connection.close()


class SqliteSource:
    """``sqlite:///PATH``: the file opened read-only."""

    blocking = True

    def __init__(self, url: str, query: str, timeout: float) -> None:
        self.path = "/" + unquote(url.removeprefix("sqlite:///")).lstrip("/")
        self.name = f"sqlite {self.path}"
        self.query, self.timeout = query, timeout
        self._connections = Connections(sqlite3.Error)

    def _connect(self) -> sqlite3.Connection:
        # check_same_thread stays on: each connection is used by the thread that made it
        return sqlite3.connect("file:" + self.path + "?mode=ro", uri=True, timeout=self.timeout)

    def lookup(self, request: RouteRequest) -> Route | None:
        def query(connection: sqlite3.Connection) -> tuple[list[str], Any]:
            cursor = connection.execute(self.query, parameters(request))
            return [d[0] for d in cursor.description or ()], cursor.fetchone()

        try:
            names, row = self._connections.run(self._connect, query)
        except sqlite3.Error as error:
            raise RouteUnavailable(f"{self.name}: {error}") from None
        return route_from_row(names, row)

    def close(self) -> None:
        self._connections.close_all()


class PostgresSource:
    """``postgresql://...`` (a libpq URI): autocommit, a statement time-out."""

    blocking = True

    def __init__(self, url: str, query: str, timeout: float) -> None:
        import psycopg  # imported only when used: the other sources do not need it

        self.psycopg = psycopg
        self.url, self.query, self.timeout = url, query, timeout
        self.name = "postgresql " + _without_password(url)
        self._connections = Connections(psycopg.Error)

    def _connect(self) -> Any:
        return self.psycopg.connect(
            self.url,
            autocommit=True,
            connect_timeout=max(1, int(self.timeout)),
            options=f"-c statement_timeout={int(self.timeout * 1000)}",
            application_name="imapproxy",
        )

    def lookup(self, request: RouteRequest) -> Route | None:
        def query(connection: Any) -> tuple[list[str], Any]:
            with connection.cursor() as cursor:
                cursor.execute(self.query, parameters(request))
                return [d.name for d in cursor.description or ()], cursor.fetchone()

        try:
            names, row = self._connections.run(self._connect, query)
        except self.psycopg.Error as error:
            lines = str(error).strip().splitlines()
            raise RouteUnavailable(
                f"{self.name}: {lines[0] if lines else type(error).__name__}"
            ) from None
        return route_from_row(names, row)

    def close(self) -> None:
        self._connections.close_all()


def _without_password(url: str) -> str:
    """The URL for the log: a password in it is masked."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return f"{scheme}{sep}{credentials.split(':', 1)[0]}:********@{host}"

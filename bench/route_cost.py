"""What routing adds to a login: ``Router.target`` in-process, per source, in microseconds.

No sockets and no servers: the route map, and SQLite with its answer cache on and off (the
thread-pool hand-off included), against no route source at all. A page costs milliseconds, so
these are the figures that say whether a cached lookup can cost pages per second.

    .venv/bin/python -m bench.route_cost
"""

from __future__ import annotations

import functools
import os
import sqlite3
import tempfile
import time
import timeit

from imapproxy.backend import Backend
from imapproxy.config import Config
from imapproxy.credentials import Credentials
from imapproxy.router import Router, build_source

USERS = 1000
LOGINS = 2000
QUERY = "SELECT host, port FROM routes WHERE login = :user"


def configs(root: str) -> dict[str, Config]:
    database = os.path.join(root, "routes.db")
    with sqlite3.connect(database) as db:
        db.execute("CREATE TABLE routes (login TEXT PRIMARY KEY, host TEXT, port INTEGER)")
        rows = [(f"user{n}", "127.0.0.1", 1143) for n in range(USERS)]
        db.executemany("INSERT INTO routes VALUES (?, ?, ?)", rows)
    db.close()
    route_map = os.path.join(root, "routes")
    with open(route_map, "w", encoding="ascii") as file:
        file.writelines(f"user{n} 127.0.0.1:1143\n" for n in range(USERS))
    base = Config(server_hostname="127.0.0.1")
    sql = {"route_sql_url": f"sqlite:///{database}", "route_sql_query": QUERY}
    return {
        "no route source": base,
        "route_map": base.replace(route_map=route_map),
        "SQLite, cached": base.replace(**sql),
        "SQLite, route_cache_ttl 0": base.replace(route_cache_ttl=0, **sql),
    }


def main() -> None:
    credentials = Credentials(b"user5", b"password")
    with tempfile.TemporaryDirectory() as root:
        for name, config in configs(root).items():
            router = Router(config, Backend(config), time.monotonic, build_source(config))
            router.target(credentials, b"digest", "127.0.0.1:1")  # warm: the cache, the pool
            look_up = functools.partial(router.target, credentials, b"digest", "127.0.0.1:1")
            seconds = timeit.timeit(look_up, number=LOGINS)
            print(f"{name:28s} {seconds / LOGINS * 1e6:8.1f} us per login")
            router.stop()


if __name__ == "__main__":
    main()

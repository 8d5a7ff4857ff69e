"""Fixtures: one real Dovecot per test session, a fresh proxy (subprocess) per test."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from gevent import socket
from hypothesis import HealthCheck, settings

from tests.support.dovecot import DovecotInstance, User, make_message, running_dovecot
from tests.support.proxy import ProxyProcess
from tests.support.routing import USERS, password

settings.register_profile(
    "fast", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "deep", max_examples=20000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))

MESSAGES_PER_USER = 5
USER_POOL = 400  # every test makes its own users (the workers tests several each)
MASTER_USER, MASTER_PASSWORD = "master", "Master-pw-1"


FIGURES: list[str] = []


@pytest.fixture
def socket_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """Two connected gevent sockets (a Unix socket pair): ours, and the peer's."""
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


@pytest.fixture
def report_figure() -> Callable[[str], None]:
    """Record a measured figure (memory per connection, soak totals) for the run's summary."""
    return FIGURES.append


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("figures measured by the tests")
        for line in FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def dovecot() -> Iterator[DovecotInstance]:
    # Dovecot re-reads the passwd-file at most once a second, so users are made up front.
    users = {f"user{n:04d}": f"pw-user{n:04d}-S3cret" for n in range(1, USER_POOL + 1)}
    masters = {MASTER_USER: MASTER_PASSWORD}
    with running_dovecot(users, masters=masters, rawlog=True) as instance:
        yield instance


_user_numbers = itertools.count(1)


@pytest.fixture
def make_user(dovecot: DovecotInstance) -> Callable[..., User]:
    """A new Dovecot user whose messages' subjects all name the user (cross-user checks)."""

    def make(password: str | None = None, messages: int = MESSAGES_PER_USER) -> User:
        name = f"user{next(_user_numbers):04d}"
        user = dovecot.users[name]
        if password is not None and password != user.password:
            user = dovecot.add_user(name, password)
            time.sleep(1.1)  # let Dovecot see the changed passwd-file
        for index in range(1, messages + 1):
            dovecot.deliver(name, make_message(f"{name} message {index}"))
        return user

    return make


@pytest.fixture
def user(make_user: Callable[..., User]) -> User:
    return make_user()


@pytest.fixture
def start_proxy(dovecot: DovecotInstance) -> Iterator[Callable[..., ProxyProcess]]:
    """Proxies in a directory of their own that the service user (nobody) can read, so that a
    SIGHUP reload finds the file (pytest's tmp_path is root-only)."""
    base = Path(tempfile.mkdtemp(prefix="ipx-proxy-"))
    os.chmod(base, 0o755)
    started: list[ProxyProcess] = []

    def start(backend: Any = None, **settings: Any) -> ProxyProcess:
        root = base / f"proxy{len(started)}"
        proxy = ProxyProcess(root, backend or dovecot, **settings)
        started.append(proxy)
        return proxy.start()

    yield start
    for proxy in started:
        proxy.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def proxy(start_proxy: Callable[..., ProxyProcess]) -> ProxyProcess:
    return start_proxy()


@pytest.fixture(scope="session")
def servers() -> Iterator[dict[str, DovecotInstance]]:
    """Two more Dovecots for the routing tests (tests.support.routing)."""
    users = {name: password(name) for name in USERS}
    with (
        running_dovecot(users, prefix="ipx-route-a-") as a,
        running_dovecot(users, prefix="ipx-route-b-") as b,
    ):
        for label, instance in (("A", a), ("B", b)):
            for name in USERS:
                instance.deliver(name, make_message(f"{name} on {label}"))
        yield {"A": a, "B": b}


@pytest.fixture
def files() -> Iterator[Path]:
    """A directory the proxy's service user (nobody) can read."""
    root = Path(tempfile.mkdtemp(prefix="ipx-routes-"))
    os.chmod(root, 0o755)
    yield root
    for path in root.iterdir():
        path.unlink()
    root.rmdir()

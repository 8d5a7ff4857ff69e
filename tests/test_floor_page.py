"""The floor page proxy (bench.floor_page) against the real Dovecot, and its pure helpers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.floor_page import login_arguments, split_completion
from bench.pages import PAGE_FETCH
from tests.support.client import REUSED, RawClient
from tests.support.dovecot import DovecotInstance, User, free_port, wait_for_port
from tests.support.polling import wait_until
from tests.support.processes import terminate

LOGOUT_REPLY = [b"* BYE Logging out\r\n", b"Z OK Logout completed\r\n"]
DOVECOT_TIMING = re.compile(rb" \(\d+\.\d+ [^)]*secs\)")  # "Select completed (0.001 + 0.000 secs)."


@dataclass(frozen=True)
class FloorPage:
    """A running ``python -m bench.floor_page serve``."""

    host: str
    port: int


def start_floor_page(
    dovecot: DovecotInstance, *options: str, log: Path | None = None
) -> Iterator[FloorPage]:
    port = free_port()
    argv = [sys.executable, "-m", "bench.floor_page", "serve", "--listen", str(port)]
    argv += ["--backend", f"{dovecot.host}:{dovecot.port}", *options]
    with open(log or os.devnull, "wb") as stderr:
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_for_port("127.0.0.1", port, timeout=15)
        yield FloorPage("127.0.0.1", port)
    finally:
        terminate(process)


@pytest.fixture(scope="module")
def floor(dovecot: DovecotInstance) -> Iterator[FloorPage]:
    yield from start_floor_page(dovecot)


@pytest.fixture(scope="module")
def floor_cached(dovecot: DovecotInstance) -> Iterator[FloorPage]:
    yield from start_floor_page(dovecot, "--select-cache")


@dataclass
class Page:
    """What one webmail page got back, reply by reply (each a list of responses)."""

    login: list[bytes]
    select: list[bytes]
    fetch: list[bytes]
    logout: list[bytes]


def page(host: str, port: int, user: User, password: str | None = None) -> Page:
    """The benchmark's page: LOGIN, SELECT INBOX, the header FETCH, LOGOUT."""
    with RawClient(host, port) as client:
        secret = user.password if password is None else password
        login = client.command(b"L1", b'LOGIN "%s" "%s"' % (user.name.encode(), secret.encode()))
        if not login[-1].startswith(b"L1 OK"):
            return Page(login, [], [], [])
        select = client.command(b"S2", b"SELECT INBOX")
        fetch = client.command(b"F3", PAGE_FETCH)
        return Page(login, select, fetch, client.command(b"Z", b"LOGOUT"))


def untimed(responses: list[bytes]) -> list[bytes]:
    """Responses without the timings Dovecot puts into its tagged completions."""
    return [DOVECOT_TIMING.sub(b"", response) for response in responses]


def clear_recent(dovecot: DovecotInstance, user: User) -> None:
    """A page direct: its session takes the messages' \\Recent (RFC 3501 §2.3.2), which no
    later session sees, so that the pages compared all show the same flags."""
    page(dovecot.host, dovecot.port, user)


def selects_seen_by_dovecot(dovecot: DovecotInstance, user: User) -> int:
    return len(re.findall(r" SELECT INBOX", dovecot.rawlog_text(user.name)))


def wait_selects(dovecot: DovecotInstance, user: User, count: int) -> int:
    """The SELECTs Dovecot's rawlog holds, once there are ``count`` (or after 1 s)."""
    wait_until(lambda: selects_seen_by_dovecot(dovecot, user) >= count, timeout=1)
    return selects_seen_by_dovecot(dovecot, user)


def logged_in(dovecot: DovecotInstance, user: User, count: int) -> bool:
    """Whether Dovecot's log has ``count`` logins of ``user`` (it writes them a moment late)."""
    return wait_until(lambda: dovecot.logins(user.name) == count, timeout=3)


# -- the pure helpers ---------------------------------------------------------------------------


def test_login_arguments_are_the_tag_and_the_rest_of_the_line() -> None:
    assert login_arguments(b'b1 LOGIN "u" "p w"\r\n') == (b"b1", b'"u" "p w"')
    assert login_arguments(b"a login user secret\r\n") == (b"a", b"user secret")


@pytest.mark.parametrize(
    "line",
    [
        b'b1 LOGIN "u" "p"',  # no line end yet
        b"b1 LOGIN \r\n",  # no arguments
        b"b1 LOGIN\r\n",
        b"b1 CAPABILITY\r\n",
        b'b1 LOGINX "u" "p"\r\n',
        b" LOGIN u p\r\n",  # no tag
        b"",
    ],
)
def test_login_arguments_refuses_anything_else(line: bytes) -> None:
    assert login_arguments(line) is None


def test_split_completion_retags_a_whole_reply() -> None:
    reply = b"* 5 EXISTS\r\n* OK [UIDNEXT 6] Predicted\r\ns1 OK [READ-WRITE] Select completed.\r\n"
    untagged, completion = split_completion(reply, b"s1 ") or (b"", b"")
    assert untagged == b"* 5 EXISTS\r\n* OK [UIDNEXT 6] Predicted\r\n"
    assert completion == b"OK [READ-WRITE] Select completed.\r\n"
    assert untagged + b"b9 " + completion == reply.replace(b"s1 ", b"b9 ")
    assert split_completion(b"s1 OK done\r\n", b"s1 ") == (b"", b"OK done\r\n")


@pytest.mark.parametrize(
    "reply",
    [
        b"* 5 EXISTS\r\ns1 OK done",  # not ended
        b"* 5 EXISTS\r\ns2 OK done\r\n",  # another tag's completion
        b"s1 OK done\r\n* 5 EXISTS\r\n",  # ends with an untagged line
        b"",
    ],
)
def test_split_completion_refuses_what_is_not_a_whole_reply(reply: bytes) -> None:
    assert split_completion(reply, b"s1 ") is None


# -- against Dovecot ----------------------------------------------------------------------------


def test_a_page_through_the_floor_is_the_page_direct(
    dovecot: DovecotInstance, floor: FloorPage, make_user: Callable[..., User]
) -> None:
    user = make_user()
    clear_recent(dovecot, user)
    direct = page(dovecot.host, dovecot.port, user)
    through = page(floor.host, floor.port, user)
    assert through.login == [b"L1 OK Logged in\r\n"]
    assert untimed(through.fetch) == untimed(direct.fetch)
    assert len(through.fetch) == 6 and untimed(through.fetch)[-1] == b"F3 OK Fetch completed.\r\n"
    assert untimed(through.select) == untimed(direct.select)
    assert through.logout == LOGOUT_REPLY


def test_the_second_login_reuses_the_backend_session(
    dovecot: DovecotInstance, floor: FloorPage, make_user: Callable[..., User]
) -> None:
    user = make_user()
    clear_recent(dovecot, user)
    direct_selects = wait_selects(dovecot, user, 1)
    first = page(floor.host, floor.port, user)
    assert logged_in(dovecot, user, 2)  # the direct page's and the floor's
    second = page(floor.host, floor.port, user)
    assert first.login == [b"L1 OK Logged in\r\n"]
    assert second.login[0].startswith(REUSED) and second.login[-1] == b"L1 OK Logged in\r\n"
    assert untimed(second.fetch) == untimed(first.fetch) and second.logout == LOGOUT_REPLY
    assert logged_in(dovecot, user, 2)  # no second backend login
    assert wait_selects(dovecot, user, direct_selects + 2) == 3  # no cache: each SELECT sent


def test_a_wrong_password_never_gets_the_pooled_session(
    dovecot: DovecotInstance, floor: FloorPage, make_user: Callable[..., User]
) -> None:
    user = make_user()
    page(floor.host, floor.port, user)  # the user's session is now in the pool
    wrong = page(floor.host, floor.port, user, password="not-the-password")
    assert wrong.login == [b"L1 NO [AUTHENTICATIONFAILED] Authentication failed\r\n"]
    assert page(floor.host, floor.port, user).login[0].startswith(REUSED)  # others unaffected


def test_anything_but_login_first_is_refused(floor: FloorPage) -> None:
    with RawClient(floor.host, floor.port) as client:
        assert client.greeting.startswith(b"* OK")
        client.send(b"c1 CAPABILITY\r\n")
        assert client.read_line() == b"* BAD LOGIN first\r\n"
        assert client.is_closed()


def test_the_select_cache_answers_the_second_select_without_the_backend(
    dovecot: DovecotInstance, floor_cached: FloorPage, make_user: Callable[..., User]
) -> None:
    user = make_user()
    clear_recent(dovecot, user)
    direct_selects = wait_selects(dovecot, user, 1)
    first = page(floor_cached.host, floor_cached.port, user)
    second = page(floor_cached.host, floor_cached.port, user)
    assert second.login[0].startswith(REUSED)
    assert second.select == first.select  # the very bytes, timing and all: kept, re-tagged
    assert second.select[-1].startswith(b"S2 OK [READ-WRITE]")
    assert untimed(second.fetch) == untimed(first.fetch)
    assert wait_selects(dovecot, user, direct_selects + 1) == 2  # the direct page's, the first
    assert logged_in(dovecot, user, 2)


def test_check_and_log_checks_each_reuse_and_logs_each_page(
    dovecot: DovecotInstance, make_user: Callable[..., User], tmp_path: Path
) -> None:
    user = make_user()
    clear_recent(dovecot, user)
    log = tmp_path / "floor.log"
    for checked in start_floor_page(dovecot, "--check-and-log", log=log):
        first = page(checked.host, checked.port, user)
        second = page(checked.host, checked.port, user)
        assert second.login[0].startswith(REUSED) and second.logout == LOGOUT_REPLY
        assert untimed(second.fetch) == untimed(first.fetch)
        assert wait_until(lambda: "C NOOP" in dovecot.rawlog_text(user.name), timeout=1)
        assert dovecot.rawlog_text(user.name).count("C NOOP") == 1  # the reuse only
        assert logged_in(dovecot, user, 2)
        # the LOGOUT line is written once the reply is sent: the client may read it first
        assert wait_until(lambda: log.read_text().count(" LOGOUT: ") == 2, timeout=5)
        lines = log.read_text().splitlines()
        assert [line.split(": ", 1)[1].split(" ")[0] for line in lines] == ["LOGIN:", "LOGOUT:"] * 2
        assert f"LOGIN: {user.name} (127.0.0.1:" in lines[2]

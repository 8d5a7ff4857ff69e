"""The SELECT cache against a real Dovecot: hits only when a fresh SELECT would say the same."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from tests.support.client import RawClient, logged_in
from tests.support.dovecot import DovecotInstance, User, make_message
from tests.support.proxy import ProxyProcess


@pytest.fixture
def proxy(start_proxy: Callable[..., ProxyProcess]) -> ProxyProcess:
    return start_proxy(enable_select_cache=True)


@pytest.fixture
def keeping_proxy(start_proxy: Callable[..., ProxyProcess]) -> ProxyProcess:
    """Sessions that saw ENABLE or CONDSTORE's words cached too (a site's choice,
    ``reuse_after_enable``): what the SELECT cache must then do with them."""
    return start_proxy(enable_select_cache=True, reuse_after_enable=True)


def counters(proxy: ProxyProcess) -> tuple[int, int, int]:
    c = proxy.counters()
    return c.TotalSelectCommands, c.SelectCacheHits, c.SelectCacheMisses


def open_page(proxy: ProxyProcess, user: User) -> RawClient:
    return logged_in(proxy.host, proxy.port, user.name, user.password)[0]


def end_page(proxy: ProxyProcess, client: RawClient, user: User) -> None:
    """LOGOUT, and wait until the session is back in the cache."""
    cached = f"LOGOUT: '{user.name}' from server sd"
    before = proxy.log_text().count(cached)
    assert client.command(b"Z", b"LOGOUT")[-1] == b"Z OK Completed\r\n"
    client.close()
    proxy.wait_for_log(cached, count=before + 1)


def select(client: RawClient, command: bytes = b"SELECT INBOX", tag: bytes = b"S") -> list[bytes]:
    client.send(tag + b" " + command + b"\r\n")
    return client.read_until_tagged(tag)


def figures(reply: list[bytes]) -> dict[str, int]:
    text = b"".join(reply).decode()
    found = {name: int(n) for n, name in re.findall(r"\* (\d+) (EXISTS|RECENT)", text)}
    found.update(
        {name: int(n) for name, n in re.findall(r"\[(UNSEEN|UIDNEXT|UIDVALIDITY) (\d+)\]", text)}
    )
    return found


def direct_figures(dovecot: DovecotInstance, user: User) -> dict[str, int]:
    """What a fresh SELECT says now, from a session of its own (RECENT aside: per session)."""
    with RawClient(dovecot.host, dovecot.port) as direct:
        direct.command(b"l", f'LOGIN {user.name} "{user.password}"'.encode())
        found = figures(direct.command(b"s", b"EXAMINE INBOX"))
        found.pop("RECENT", None)
        return found


def store_elsewhere(dovecot: DovecotInstance, user: User, command: bytes) -> None:
    """The same user, in a session of its own (a desktop client), changes flags."""
    with RawClient(dovecot.host, dovecot.port) as other:
        other.command(b"l", f'LOGIN {user.name} "{user.password}"'.encode())
        other.command(b"s", b"SELECT INBOX")
        assert other.command(b"f", b"STORE " + command)[-1].startswith(b"f OK")


def selects_seen_by_dovecot(dovecot: DovecotInstance, user: User) -> int:
    return len(re.findall(r" (?:SELECT|select) ", dovecot.rawlog_text(user.name)))


def two_pages(
    proxy: ProxyProcess,
    user: User,
    between: Callable[[RawClient], None] | None = None,
    second: bytes = b"SELECT INBOX",
) -> tuple[list[bytes], list[bytes]]:
    client = open_page(proxy, user)
    first_reply = select(client)
    if between is not None:
        between(client)
    end_page(proxy, client, user)
    client = open_page(proxy, user)
    second_reply = select(client, second)
    end_page(proxy, client, user)
    return first_reply, second_reply


def fresh_reselect(dovecot: DovecotInstance, user: User) -> list[bytes]:
    """The untagged lines a fresh SELECT gives now in a session that has INBOX selected."""
    with RawClient(dovecot.host, dovecot.port) as direct:
        direct.command(b"l", f'LOGIN {user.name} "{user.password}"'.encode())
        direct.command(b"s", b"SELECT INBOX")
        return direct.command(b"s2", b"SELECT INBOX")[:-1]


def teach_closed_line(proxy: ProxyProcess, user: User) -> None:
    """A page that selects twice: the proxy learns the server's [CLOSED] line."""
    client = open_page(proxy, user)
    select(client, tag=b"T1")
    select(client, tag=b"T2")
    end_page(proxy, client, user)


def test_hit_is_what_a_fresh_select_says(
    proxy: ProxyProcess, user: User, dovecot: DovecotInstance
) -> None:
    teach_closed_line(proxy, user)
    client = open_page(proxy, user)
    hit = select(client, tag=b"S3")
    end_page(proxy, client, user)
    assert counters(proxy) == (3, 1, 2)
    assert hit[:-1] == fresh_reselect(dovecot, user)
    assert hit[0] == b"* OK [CLOSED] Previous mailbox closed.\r\n"
    assert hit[-1].startswith(b"S3 OK [READ-WRITE] Select completed")


def test_hit_is_served_without_select_reaching_the_backend(
    proxy: ProxyProcess, user: User, dovecot: DovecotInstance
) -> None:
    teach_closed_line(proxy, user)
    before = selects_seen_by_dovecot(dovecot, user)
    first, second = two_pages(proxy, user)
    assert counters(proxy) == (4, 2, 2)
    assert selects_seen_by_dovecot(dovecot, user) == before  # two pages, no SELECT reached it
    assert second[-1].startswith(b"S OK [READ-WRITE]")
    assert figures(second)["RECENT"] == 0  # as a fresh SELECT in that session would say
    expected = figures(first)
    expected.pop("RECENT")
    got = figures(second)
    got.pop("RECENT")
    assert got == expected == direct_figures(dovecot, user)
    assert "SELECT answered from the SELECT cache" not in proxy.log_text()  # trace only


@pytest.mark.parametrize(
    "form", [b'SELECT "INBOX"', b"SELECT inbox", b"select InBoX", b"SELECT {5}\r\nINBOX"]
)
def test_name_forms_are_one_mailbox(proxy: ProxyProcess, user: User, form: bytes) -> None:
    teach_closed_line(proxy, user)
    client = open_page(proxy, user)
    if b"{" in form:
        line, literal = form.split(b"\r\n")
        client.send(b"S " + line + b"\r\n")
        assert client.read_line() == b"+ go ahead\r\n"
        client.send(literal + b"\r\n")
        reply = client.read_until_tagged(b"S")
    else:
        reply = select(client, form)
    assert reply[-1].startswith(b"S OK [READ-WRITE]")
    end_page(proxy, client, user)
    assert counters(proxy)[1] == 1


def test_new_mail_between_pages(proxy: ProxyProcess, user: User, dovecot: DovecotInstance) -> None:
    first, second = two_pages(
        proxy, user, lambda _: dovecot.deliver(user.name, make_message(f"{user.name} new"))
    )
    assert counters(proxy)[1] == 0
    assert figures(second)["EXISTS"] == figures(first)["EXISTS"] + 1
    assert figures(second)["UIDNEXT"] == figures(first)["UIDNEXT"] + 1


def test_new_mail_seen_by_an_earlier_page(
    proxy: ProxyProcess, user: User, dovecot: DovecotInstance
) -> None:
    def between(client: RawClient) -> None:  # the news reaches the first page's client
        dovecot.deliver(user.name, make_message(f"{user.name} new"))
        assert any(b"EXISTS" in r for r in client.command(b"n", b"NOOP"))

    first, second = two_pages(proxy, user, between)
    assert counters(proxy)[1] == 0
    assert figures(second)["EXISTS"] == figures(first)["EXISTS"] + 1


def test_seen_flag_set_by_another_session(
    proxy: ProxyProcess, user: User, dovecot: DovecotInstance
) -> None:
    def between(_: RawClient) -> None:
        store_elsewhere(dovecot, user, b"1 +FLAGS (\\Seen)")

    first, second = two_pages(proxy, user, between)
    assert counters(proxy)[1] == 0
    assert figures(first)["UNSEEN"] == 1 and figures(second)["UNSEEN"] == 2


def test_flagged_by_another_session_after_news_reached_the_client(
    proxy: ProxyProcess, user: User, dovecot: DovecotInstance
) -> None:
    """A change that does not alter the SELECT reply may be served: the reply is still exact."""

    def between(client: RawClient) -> None:
        store_elsewhere(dovecot, user, b"2 +FLAGS (\\Flagged)")
        client.command(b"n", b"NOOP")

    teach_closed_line(proxy, user)
    first, second = two_pages(proxy, user, between)
    expected = figures(first)
    expected.pop("RECENT")
    got = figures(second)
    got.pop("RECENT")
    assert counters(proxy)[1] == 2  # both pages served from the cache, and exact
    assert got == expected == direct_figures(dovecot, user)


@pytest.mark.parametrize(
    "commands",
    [
        [b"STORE 1 +FLAGS (\\Seen)"],
        [b"UID STORE 1 +FLAGS (\\Flagged)"],
        [b"STORE 1 +FLAGS (\\Deleted)", b"EXPUNGE"],
        [b"FETCH 1 (BODY[])"],  # not PEEK: sets \\Seen
        [b"EXAMINE INBOX"],
        [b"CLOSE"],
        [b"UNSELECT"],
        [b"CREATE Other", b"SELECT Other"],
        [b"APPEND INBOX {9+}\r\nSubject: ", b"NOOP"],
    ],
)
def test_commands_of_the_earlier_page_invalidate(
    proxy: ProxyProcess,
    make_user: Callable[..., User],
    dovecot: DovecotInstance,
    commands: list[bytes],
) -> None:
    invalidated_by(proxy, make_user(), dovecot, commands)


@pytest.mark.parametrize("commands", [[b"ENABLE CONDSTORE"], [b"SELECT INBOX (CONDSTORE)"]])
def test_condstore_on_the_earlier_page_invalidates(
    keeping_proxy: ProxyProcess,
    make_user: Callable[..., User],
    dovecot: DovecotInstance,
    commands: list[bytes],
) -> None:
    invalidated_by(keeping_proxy, make_user(), dovecot, commands)


def invalidated_by(
    proxy: ProxyProcess, user: User, dovecot: DovecotInstance, commands: list[bytes]
) -> None:
    """The first page runs ``commands``: the second one's SELECT is no hit, and exact."""

    def between(client: RawClient) -> None:
        for number, command in enumerate(commands):
            reply = client.command(b"c%d" % number, command)
            assert reply[-1].startswith(b"c%d OK" % number), reply

    first, second = two_pages(proxy, user, between)
    total, hits, misses = counters(proxy)
    assert hits == 0, (commands, second)
    got = figures(second)
    got.pop("RECENT", None)
    assert got == direct_figures(dovecot, user)


def test_condstore_sessions_are_never_served(keeping_proxy: ProxyProcess, user: User) -> None:
    proxy = keeping_proxy
    client = open_page(proxy, user)
    client.command(b"e", b"ENABLE CONDSTORE")
    select(client)
    end_page(proxy, client, user)
    client = open_page(proxy, user)
    reply = select(client)
    assert any(b"HIGHESTMODSEQ" in line for line in reply)
    end_page(proxy, client, user)
    assert counters(proxy)[1] == 0


def test_rename_and_delete_of_the_cached_mailbox(proxy: ProxyProcess, user: User) -> None:
    client = open_page(proxy, user)
    client.command(b"c", b"CREATE Box")
    select(client, b"SELECT Box")
    end_page(proxy, client, user)
    client = open_page(proxy, user)
    client.command(b"r", b"RENAME Box Box2")
    assert select(client, b"SELECT Box")[-1].startswith(b"S NO")
    assert client.command(b"d", b"DELETE Box2")[-1].startswith(b"d OK")
    assert select(client, b"SELECT Box2", tag=b"T")[-1].startswith(b"T NO")
    end_page(proxy, client, user)
    assert counters(proxy)[1] == 0


def test_other_mailbox_then_back(proxy: ProxyProcess, user: User) -> None:
    client = open_page(proxy, user)
    client.command(b"c", b"CREATE Other")
    select(client)
    end_page(proxy, client, user)
    client = open_page(proxy, user)
    assert select(client, b"SELECT Other")[-1].startswith(b"S OK")  # a miss: other mailbox
    end_page(proxy, client, user)
    client = open_page(proxy, user)
    assert select(client)[-1].startswith(b"S OK [READ-WRITE]")  # INBOX again: a miss
    fetched = client.command(b"f", b"FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert f"{user.name} message 1".encode() in fetched[0]
    end_page(proxy, client, user)
    assert counters(proxy)[1:] == (0, 3)


def test_keyword_created_by_another_session(
    proxy: ProxyProcess, user: User, dovecot: DovecotInstance
) -> None:
    def between(client: RawClient) -> None:
        store_elsewhere(dovecot, user, b"3 +FLAGS ($Important)")
        client.command(b"n", b"NOOP")  # the new FLAGS list reaches the first page only

    first, second = two_pages(proxy, user, between)
    assert counters(proxy)[1] == 0
    assert any(b"$Important" in line for line in second if line.startswith(b"* FLAGS"))


def test_select_cache_off_counts_nothing_and_unselects(
    start_proxy: Callable[..., ProxyProcess], user: User, dovecot: DovecotInstance
) -> None:
    proxy = start_proxy()
    two_pages(proxy, user)
    assert counters(proxy) == (0, 0, 0)
    assert selects_seen_by_dovecot(dovecot, user) == 2
    assert "UNSELECT" in dovecot.rawlog_text(user.name)

"""The real pimpstat: ``-c`` byte for byte against Debian's, its exit statuses, and the curses
screen driven in tmux (send-keys, capture-pane) against a live proxy."""

from __future__ import annotations

import itertools
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imapproxy import stats
from tests.support.client import RawClient, logged_in
from tests.support.dovecot import User
from tests.support.polling import wait_until
from tests.support.proxy import REPO, ProxyProcess, write_config
from tests.support.statsfile import close_file

PIMPSTAT = [sys.executable, "-m", "pimpstat.app"]
DEBIAN_PIMPSTAT = "/usr/sbin/pimpstat"
WAIT_S = 5.0  # pimpstat refreshes every second
HELP = "q quit  r redraw  m menu"

needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
needs_debian = pytest.mark.skipif(
    not os.access(DEBIAN_PIMPSTAT, os.X_OK), reason="Debian's imapproxy is not installed"
)


def pimpstat(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*PIMPSTAT, *args], cwd=REPO, capture_output=True, timeout=30)


def debian_pimpstat(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([DEBIAN_PIMPSTAT, *args], capture_output=True, timeout=30)


def pimpstat_config(tmp_path: Path, stat_path: Path) -> Path:
    values = {"server_hostname": "127.0.0.1", "stat_filename": stat_path}
    return write_config(tmp_path / "imapproxy.conf", values)


def logged_in_as(proxy: ProxyProcess, user: User) -> RawClient:
    return logged_in(proxy.host, proxy.port, user.name, user.password)[0]


def log_out(client: RawClient) -> None:
    with client:
        assert client.command(b"L9", b"LOGOUT")[-1].startswith(b"L9 OK")


def steady_counters(config: Path) -> bytes:
    """Our ``-c`` output once two readings 0.2 s apart agree (the proxy has settled)."""
    deadline = time.monotonic() + WAIT_S
    last = pimpstat("-c", "-f", str(config)).stdout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = pimpstat("-c", "-f", str(config)).stdout
        if now == last:
            return now
        last = now
    raise AssertionError(f"counters never settled:\n{last.decode()}")


# -- pimpstat -c ----------------------------------------------------------------------------------


@needs_debian
def test_dash_c_is_byte_identical_to_debians_on_a_live_proxy(
    start_proxy: Callable[..., ProxyProcess], make_user: Callable[..., User]
) -> None:
    proxy = start_proxy()
    first, second = make_user(), make_user()
    log_out(logged_in_as(proxy, first))
    log_out(logged_in_as(proxy, first))  # reuses the cached connection
    active = logged_in_as(proxy, second)
    try:
        ours = steady_counters(proxy.config_path)
        theirs = debian_pimpstat("-c", "-f", str(proxy.config_path))
        assert theirs.returncode == 0, theirs.stderr
        assert ours == theirs.stdout
        assert b" 3 Total Client Logins\n 1 Total Reused Connections\n 2 Total Created" in ours
    finally:
        active.close()


def test_dash_c_reads_a_file_written_by_up_imapproxy(tmp_path: Path) -> None:
    """72 bytes, no extension; counters past 2**31 print as C's %d prints them."""
    counts = [2**32 - 1, 2**31, *range(3, 14)]
    stat_path = tmp_path / "pimpstats"
    stat_path.write_bytes(stats.UP_IMAPPROXY_STRUCT.pack(1_700_000_000, 1_700_000_100, *counts))
    config = pimpstat_config(tmp_path, stat_path)
    ours = pimpstat("-c", "-f", str(config))
    assert ours.returncode == 0, ours.stderr
    lines = ours.stdout.decode().splitlines()
    assert lines[:2] == [" -1 Current Client Connections", " -2147483648 Peak Client Connections"]
    assert lines[8:10] == [" 10 Total Reused Connections", " 9 Total Created Connections"]
    assert len(lines) == 12
    if os.access(DEBIAN_PIMPSTAT, os.X_OK):
        assert ours.stdout == debian_pimpstat("-c", "-f", str(config)).stdout


@pytest.mark.parametrize("content", [None, b"\0" * 50], ids=["missing", "short"])
def test_dash_c_without_a_statistics_file_exits_66(tmp_path: Path, content: bytes | None) -> None:
    stat_path = tmp_path / "pimpstats"
    if content is not None:
        stat_path.write_bytes(content)
    result = pimpstat("-c", "-f", str(pimpstat_config(tmp_path, stat_path)))
    assert result.returncode == 66
    assert result.stdout == b""
    reason = "No such file or directory" if content is None else "50 bytes, shorter than"
    assert result.stderr.decode().startswith(
        f"pimpstat: cannot read statistics file {stat_path}: {reason}"
    )


def test_a_missing_configuration_exits_78(tmp_path: Path) -> None:
    result = pimpstat("-c", "-f", str(tmp_path / "nowhere.conf"))
    assert result.returncode == 78
    assert (
        result.stderr.decode()
        == f"pimpstat: {tmp_path}/nowhere.conf: cannot read: No such file or directory\n"
    )


def test_a_wrong_configuration_exits_78(tmp_path: Path) -> None:
    config = tmp_path / "imapproxy.conf"
    config.write_text("server_hostname 127.0.0.1\nstat_filname /tmp/x\n")
    result = pimpstat("-f", str(config))
    assert result.returncode == 78
    assert result.stderr.decode() == f"pimpstat: {config}:2: stat_filname: unknown key\n"


@pytest.mark.parametrize("option", ["-h", "--help"])
def test_help(option: str) -> None:
    result = pimpstat(option)
    assert result.returncode == 0
    assert result.stdout.decode().startswith("usage: pimpstat [-f config filename] [-h] [-c]\n")


# -- the curses screen in tmux --------------------------------------------------------------------

_sessions = itertools.count()


class TmuxSession:
    """pimpstat in a detached tmux session on a private tmux server, its stderr in a file."""

    def __init__(self, tmp_path: Path, config: Path, width: int = 100, height: int = 40) -> None:
        self.socket = tmp_path / f"tmux-{next(_sessions)}.sock"  # a private tmux server
        self.name = "pimpstat"
        self.stderr_path = tmp_path / "pimpstat.stderr"
        command = (
            f"{shlex.join([*PIMPSTAT, '-f', str(config)])} 2>{shlex.quote(str(self.stderr_path))}"
        )
        size = ["-x", str(width), "-y", str(height)]
        self.tmux("new-session", "-d", "-s", self.name, *size, "-c", str(REPO), command)

    def tmux(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = ["tmux", "-f", "/dev/null", "-S", str(self.socket), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=10)

    def send(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", self.name, *keys)

    def resize(self, width: int, height: int) -> None:
        self.tmux("resize-window", "-t", self.name, "-x", str(width), "-y", str(height))

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", self.name).stdout

    def alive(self) -> bool:
        return self.tmux("has-session", "-t", self.name).returncode == 0

    def stderr(self) -> str:
        return self.stderr_path.read_text() if self.stderr_path.exists() else ""

    def wait_for(self, check: Callable[[str], bool], what: str) -> str:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            screen = self.screen()
            if check(screen):
                return screen
            time.sleep(0.1)
        raise AssertionError(f"no {what} on screen:\n{self.screen()}\nstderr:\n{self.stderr()}")

    def wait_for_text(self, *texts: str) -> str:
        return self.wait_for(lambda screen: all(text in screen for text in texts), repr(texts))

    def wait_for_end(self) -> None:
        assert wait_until(lambda: not self.alive(), WAIT_S), self.screen()

    def kill(self) -> None:
        self.tmux("kill-server")


@pytest.fixture
def tmux_pimpstat(tmp_path: Path) -> Iterator[Callable[[Path], TmuxSession]]:
    sessions: list[TmuxSession] = []

    def start(config: Path) -> TmuxSession:
        sessions.append(TmuxSession(tmp_path, config))
        return sessions[-1]

    try:
        yield start
    finally:
        for session in sessions:
            session.kill()


def figure(screen: str, label: str) -> str | None:
    """What follows ``label`` on the screen line that starts with it (inside the border)."""
    for line in screen.splitlines():
        text = line.strip("│ ")
        if text.startswith(label):
            return text[len(label) :].strip()
    return None


def shown(text: str | None, path: str) -> bool:
    """``path`` as pimpstat shows a long text: whole, or ``...`` and its end."""
    return text == path or (text is not None and text.startswith("...") and path.endswith(text[3:]))


def showing(label: str, value: str) -> Callable[[str], bool]:
    return lambda screen: figure(screen, label) == value


def choose(session: TmuxSession, number: str, title: str) -> str:
    """The view menu (``m``), item ``number``, Enter; the screen once ``title`` shows."""
    session.send("m")
    session.wait_for_text("Enter selects; q or Esc goes back")
    session.send(number, "Enter")
    return session.wait_for_text(f"pimpstat: {title}")


@needs_tmux
def test_the_screen_follows_a_live_proxy(
    start_proxy: Callable[..., ProxyProcess],
    make_user: Callable[..., User],
    tmux_pimpstat: Callable[[Path], TmuxSession],
) -> None:
    proxy = start_proxy()
    session = tmux_pimpstat(proxy.config_path)
    screen = session.wait_for(showing("client logins:", "0"), "client logins 0")
    for text in ("Server Start Time:", "CLIENT CONNECTIONS", "SELECT CACHE NOT ENABLED", HELP):
        assert text in screen
    assert "IMAPPROXY TOTALS" in screen  # our file has the extension

    user = make_user()
    log_out(logged_in_as(proxy, user))
    log_out(logged_in_as(proxy, user))
    screen = session.wait_for(showing("client logins:", "2"), "client logins 2")
    assert figure(screen, "server connections created:") == "1"
    assert figure(screen, "server connection reuses:") == "1"
    assert figure(screen, "client login to server login ratio:") == "2.00 : 1"

    screen = choose(session, "2", "rates")
    assert "RATES PER SECOND (LAST INTERVAL)" in screen
    assert figure(screen, "connection cache (reuses / logins):") == "50.0 %"
    log_out(logged_in_as(proxy, user))
    session.wait_for(
        lambda s: figure(s, "client logins:") not in (None, "N/A", "0.00 /s"), "a login rate"
    )

    screen = choose(session, "3", "about")
    assert shown(figure(screen, "statistics file (read-only):"), str(proxy.stat_path))

    session.resize(60, 20)
    screen = session.wait_for_text("pimpstat: about", HELP)
    assert max(len(line) for line in screen.splitlines()) <= 60
    session.resize(20, 6)
    session.wait_for(lambda s: s.startswith("┌─ pimpstat: ab"), "a clipped title")
    session.resize(100, 40)
    session.wait_for(lambda s: "VIEWS" in s and len(s.splitlines()[0]) == 100, "a redraw at 100x40")
    choose(session, "4", "servers")  # the server the logins above reached, up
    server = f"{proxy.settings['server_hostname']}:{proxy.settings['server_port']}"
    session.wait_for_text("IMAP SERVERS", f"{server} ({server}): UP")
    choose(session, "1", "counters")
    session.wait_for(showing("client logins:", "3"), "client logins 3")

    session.send("r")
    session.wait_for_text("CONNECTION TOTALS", HELP)
    session.send("q")
    session.wait_for_end()
    assert session.stderr() == ""


@needs_tmux
def test_the_screen_waits_for_a_missing_or_short_file(
    tmp_path: Path, tmux_pimpstat: Callable[[Path], TmuxSession]
) -> None:
    stat_path = tmp_path / "pimpstats"
    session = tmux_pimpstat(pimpstat_config(tmp_path, stat_path))
    screen = session.wait_for_text("WAITING FOR THE STATISTICS FILE")
    assert figure(screen, "problem:") == "No such file or directory"
    assert shown(figure(screen, "file:"), str(stat_path))

    stat_path.write_bytes(b"\0" * 10)
    session.wait_for(
        showing("problem:", "10 bytes, shorter than a statistics file (72 bytes)"), "short file"
    )

    counters = stats.create_file(str(stat_path))
    try:
        counters.start(int(time.time()))
        counters.TotalClientLogins = 42
        session.wait_for(showing("client logins:", "42"), "the file's figures")
    finally:
        close_file(counters)

    stat_path.unlink()
    session.wait_for_text("WAITING FOR THE STATISTICS FILE")
    session.send("C-c")  # up-imapproxy's way out: the terminal is restored, the session ends
    session.wait_for_end()
    assert session.stderr() == ""


# -- a file of several workers (workers N) ---------------------------------------------------------


def worker_file(stat_path: Path) -> tuple[stats.Counters, stats.Totals]:
    """Three workers with figures of their own, summed once by the supervisor's Totals."""
    counters = stats.create_file(str(stat_path), workers=3)
    totals = stats.Totals(counters)
    totals.start(1_700_000_000)
    for index, worker in enumerate(totals.workers, start=1):
        worker.start(1_700_000_001)
        for _ in range(index):
            worker.client_connected()
        worker.set_server_connections(index, 2 * index)
        worker.TotalClientLogins = 10 * index
        worker.TotalServerConnectionsCreated = index
        worker.TotalServerConnectionsReused = 10 * index - index
        worker.SelectCacheHits, worker.SelectCacheMisses = index, 100 + index
        counters.set_worker_pid(index - 1, 4000 + index)
    totals.update()
    return counters, totals


WORKER_TOTALS = (
    " 6 Current Client Connections\n"
    " 6 Peak Client Connections\n"
    " 6 In Use Connections\n"
    " 6 Peak In Use Connections\n"
    " 12 Retained Server Connections\n"
    " 12 Peak Retained Server Connections\n"
    " 6 Total Client Connections\n"
    " 60 Total Client Logins\n"
    " 54 Total Reused Connections\n"
    " 6 Total Created Connections\n"
    " 6 Cache Hits\n"
    " 306 Cache Misses\n"
)


@needs_debian
def test_debians_dash_c_reads_the_totals_of_a_multi_worker_file(tmp_path: Path) -> None:
    """Debian's pimpstat reads the first 72 bytes of a longer file: the supervisor's totals,
    the same 12 lines as ours."""
    stat_path = tmp_path / "pimpstats"
    counters, totals = worker_file(stat_path)
    try:
        config = pimpstat_config(tmp_path, stat_path)
        theirs = debian_pimpstat("-c", "-f", str(config))
        assert theirs.returncode == 0, theirs.stderr
        assert theirs.stdout.decode() == WORKER_TOTALS
        assert pimpstat("-c", "-f", str(config)).stdout == theirs.stdout
    finally:
        close_file(counters, totals)


def test_our_dash_c_sums_the_workers_between_the_supervisors_updates(tmp_path: Path) -> None:
    stat_path = tmp_path / "pimpstats"
    counters, totals = worker_file(stat_path)
    try:
        totals.workers[2].TotalClientLogins += 5  # not yet summed into the totals block
        config = pimpstat_config(tmp_path, stat_path)
        ours = pimpstat("-c", "-f", str(config)).stdout.decode()
        assert ours == WORKER_TOTALS.replace(" 60 Total Client Logins", " 65 Total Client Logins")
        if os.access(DEBIAN_PIMPSTAT, os.X_OK):  # Debian's shows the last sample
            assert debian_pimpstat("-c", "-f", str(config)).stdout.decode() == WORKER_TOTALS
    finally:
        close_file(counters, totals)


@needs_tmux
def test_the_workers_view_on_screen(
    tmp_path: Path, tmux_pimpstat: Callable[[Path], TmuxSession]
) -> None:
    stat_path = tmp_path / "pimpstats"
    counters, totals = worker_file(stat_path)
    try:
        session = tmux_pimpstat(pimpstat_config(tmp_path, stat_path))
        session.wait_for(showing("client logins:", "60"), "the summed logins")
        screen = choose(session, "5", "workers")
        assert "WORKER PROCESSES" in screen
        lines = [line.strip("│ ").split() for line in screen.splitlines()]
        assert ["worker", "pid", "clients", "active", "cached", "logins", "reused"] in [
            line[:7] for line in lines
        ]
        assert ["0", "4001", "1", "1", "2", "10", "9", "90.0", "%", "0"] in lines
        assert ["2", "4003", "3", "3", "6", "30", "27", "90.0", "%", "0"] in lines
        assert ["total", "6", "6", "12", "60", "54", "90.0", "%", "0"] in lines
        totals.worker_exited(1)  # worker 1 died: an empty slot, its figures kept in the totals
        counters.count_worker_restart(1)
        session.wait_for(lambda s: "1       -       0" in s, "an empty slot")
        screen = session.wait_for(showing("workers restarted after dying:", "1"), "a restart")
        assert ["total", "4", "4", "8", "60", "54", "90.0", "%", "1"] in [
            line.strip("│ ").split() for line in screen.splitlines()
        ]
        screen = choose(session, "3", "about")
        assert figure(screen, "workers:") == "3 (a supervisor and 3 worker processes)"
        session.send("q")
        session.wait_for_end()
        assert session.stderr() == ""
    finally:
        close_file(counters, totals)

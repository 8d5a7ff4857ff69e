"""The hand-over on restart, with real Dovecots: a successor takes the listeners and the cached
sessions of the running proxy (``--take-over``, SIGUSR2), and the bad cases leave it serving."""

from __future__ import annotations

import contextlib
import imaplib
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gevent
import gevent.event
import pytest
from gevent import socket as gsocket

from imapproxy import successor, takeover
from imapproxy.session_transfer import (
    FORMAT_VERSION,
    MAGIC,
    MAX_MESSAGE_BYTES,
    HasherKey,
    Hello,
    Kind,
    Listeners,
    Marker,
    Refused,
    SessionRecord,
    TransferError,
    decode,
    encode,
)
from tests.support.client import REUSED, imaplib_reused, logged_in, page
from tests.support.dovecot import DovecotInstance, User
from tests.support.polling import wait_until
from tests.support.proxy import ProxyProcess, run_imapproxyd, service_identity, write_config
from tests.support.routing import admin, at, routed_proxy, visit, write_map


def session_ids(dovecot: DovecotInstance, user: str) -> list[str]:
    """Dovecot's session ids of the user's logins, in order (its login process logs them)."""
    return re.findall(rf"Login: user=<{re.escape(user)}>.*session=<([^>]+)>", dovecot.log_text())


def logged_out_ids(dovecot: DovecotInstance, user: str) -> list[str]:
    pattern = rf"imap\({re.escape(user)}\)<[0-9]+><([^>]+)>: .*Logged out"
    return re.findall(pattern, dovecot.log_text())


def test_take_over_moves_the_cached_session(
    start_proxy: Callable[..., ProxyProcess], user: User, dovecot: DovecotInstance
) -> None:
    proxy = start_proxy()
    assert not page(proxy.host, proxy.port, user.name, user.password)[0].startswith(REUSED)
    proxy.wait_for_log(f"LOGOUT: '{user.name}' from server sd")
    (session,) = session_ids(dovecot, user.name)
    successor = proxy.successor().start()
    try:
        assert proxy.process is not None and proxy.process.wait(timeout=30) == 0
        assert page(proxy.host, proxy.port, user.name, user.password)[0].startswith(REUSED)
        assert session_ids(dovecot, user.name) == [session]  # no new login at Dovecot
        assert logged_out_ids(dovecot, user.name) == []
    finally:
        assert successor.stop(signal.SIGTERM) == 0
    assert session in logged_out_ids(dovecot, user.name)
    assert user.password not in proxy.log_text() + successor.log_text()
    assert "hand-over: 1 of 1 sessions adopted" in successor.log_text()


def test_take_over_with_nobody_to_take_from_exits_69(
    tmp_path: Path, dovecot: DovecotInstance
) -> None:
    path = tmp_path / "nobody-here.takeover"
    settings = {"server_hostname": dovecot.host, "server_port": dovecot.port}
    config = write_config(
        tmp_path / "imapproxy.conf",
        {**settings, "takeover_socket": path, "stat_filename": "", "protocol_log_filename": ""}
        | service_identity(),
    )
    run = run_imapproxyd("-f", str(config), "--foreground", "--take-over")
    assert run.returncode == 69, run.stderr
    assert f"--take-over: no running imapproxy at {path}: No such file or directory" in run.stderr


def read_pid(path: Path, other_than: int) -> int:
    """The pid in the pid file once it is no longer ``other_than``."""
    assert wait_until(lambda: path.exists() and path.read_text().strip() != str(other_than))
    return int(path.read_text())


def exit_code(proxy: ProxyProcess, timeout: float) -> int:
    """The old proxy's exit code once it has handed over; its log in the failure if it never ends."""
    assert proxy.process is not None
    try:
        return proxy.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the old proxy did not exit in {timeout} s:\n{proxy.log_text()[-8000:]}")


def gone(pid: int) -> bool:
    """Exited (a zombie counts: the successor is not our child, and this container's init may
    not reap orphans at once)."""
    try:
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


def successors_of(proxy: ProxyProcess) -> set[int]:
    """The pids of the successors (``--take-over``) started on this proxy's configuration;
    not their workers (their supervisor stops them)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            stat_fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # not a process, or gone
            continue
        if b"--take-over" in argv and str(proxy.config_path).encode() in argv:
            parents[int(entry.name)] = int(stat_fields[1])
    return {pid for pid, parent in parents.items() if parent not in parents}


def end_both(proxy: ProxyProcess, successor_pid: int) -> None:
    """Stop a successor started on SIGUSR2 (not the test's child) and the proxy it followed;
    also one the test did not get to learn of, when it failed before that."""
    for pid in {successor_pid} - {0} | successors_of(proxy):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        assert wait_until(lambda pid=pid: gone(pid), timeout=30)
    proxy.stop()
    shutil.rmtree(proxy.root, ignore_errors=True)


def test_sigusr2_starts_a_successor_that_takes_over(
    start_proxy: Callable[..., ProxyProcess], user: User, dovecot: DovecotInstance
) -> None:
    """SIGUSR2: the proxy has its successor started (by the privileged reader when it ran as
    root), which rewrites the pid file and serves the cached session; the old one exits 0."""
    proxy = ProxyProcess(Path(tempfile.mkdtemp(prefix="ipx-usr2-")), dovecot)
    pidfile = proxy.root / "imapproxy.pid"
    proxy.args = ["-p", str(pidfile)]
    proxy.start()
    assert proxy.process is not None
    old_pid = proxy.process.pid
    successor_pid = 0
    try:
        page(proxy.host, proxy.port, user.name, user.password)
        proxy.wait_for_log(f"LOGOUT: '{user.name}' from server sd")
        (session,) = session_ids(dovecot, user.name)
        assert proxy.socket_path().exists()
        proxy.process.send_signal(signal.SIGUSR2)
        assert proxy.process.wait(timeout=60) == 0
        successor_pid = read_pid(pidfile, old_pid)
        assert page(proxy.host, proxy.port, user.name, user.password)[0].startswith(REUSED)
        assert session_ids(dovecot, user.name) == [session]
        log = proxy.log_text()
        assert f"SIGUSR2: started successor pid {successor_pid}" in log
        assert f"hand-over: pid {successor_pid} is serving with 1 sessions" in log
    finally:
        end_both(proxy, successor_pid)
    assert session in logged_out_ids(dovecot, user.name)
    assert not pidfile.exists()  # the successor removed its own


def test_a_successor_with_a_bad_configuration_leaves_the_proxy_serving(
    start_proxy: Callable[..., ProxyProcess], user: User, dovecot: DovecotInstance
) -> None:
    """The successor exits 78 before it contacts the running proxy, which says so and serves
    on, its cached session still there."""
    proxy = start_proxy()
    page(proxy.host, proxy.port, user.name, user.password)
    proxy.wait_for_log(f"LOGOUT: '{user.name}' from server sd")
    good = proxy.config_path.read_text()
    proxy.config_path.write_text(good + "no_such_key 1\n")
    assert proxy.process is not None
    proxy.process.send_signal(signal.SIGUSR2)
    log = proxy.wait_for_log("before taking over; still serving", timeout=30)
    assert re.search(r"successor pid [0-9]+ exited with status 78 before taking over", log)
    assert "no_such_key" in log  # the successor's own reason, on the same stderr
    assert proxy.process.poll() is None
    assert page(proxy.host, proxy.port, user.name, user.password)[0].startswith(REUSED)


def fake_successor_hello(path: Path, version: int) -> bytes:
    """Connect to the hand-over socket as a successor speaking ``version``; the first reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.send(MAGIC + bytes([Kind.HELLO]) + version.to_bytes(2, "big") + b"\x00\x00\x00\x01")
        return sock.recv(MAX_MESSAGE_BYTES)


def test_a_successor_of_another_format_version_is_refused(
    start_proxy: Callable[..., ProxyProcess], user: User
) -> None:
    proxy = start_proxy()
    page(proxy.host, proxy.port, user.name, user.password)
    proxy.wait_for_log(f"LOGOUT: '{user.name}' from server sd")
    reply = decode(fake_successor_hello(proxy.socket_path(), 999))
    assert reply == Refused("hand-over format version 999; this program speaks 1")
    proxy.wait_for_log(
        "hand-over: refused a successor: hand-over format version 999; this program speaks 1; "
        "still serving"
    )
    assert page(proxy.host, proxy.port, user.name, user.password)[0].startswith(REUSED)


def cached_users(proxy: ProxyProcess, make_user: Callable[..., User], count: int) -> list[User]:
    """``count`` new users, each with a session cached in ``proxy``."""
    users = [make_user() for _ in range(count)]
    for user in users:
        page(proxy.host, proxy.port, user.name, user.password)
        proxy.wait_for_log(f"LOGOUT: '{user.name}' from server sd")
    return users


@contextlib.contextmanager
def fake_successor(proxy: ProxyProcess) -> Iterator[socket.socket]:
    """A successor written here, connected to ``proxy``'s hand-over socket: HELLO said."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(10)
        sock.connect(str(proxy.socket_path()))
        sock.send(encode(Hello(FORMAT_VERSION, 1)))
        yield sock


def test_a_successor_that_dies_mid_transfer_leaves_every_session_in_place(
    start_proxy: Callable[..., ProxyProcess], make_user: Callable[..., User]
) -> None:
    """A successor that took the listeners and some sessions and then vanished before READY:
    the old process takes its sessions back and serves on; each user's next login reuses."""
    proxy = start_proxy()
    users = cached_users(proxy, make_user, 3)
    with fake_successor(proxy) as sock:
        received = []
        for _ in range(4):  # HELLO, LISTENERS, KEY, the first session: then gone
            data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE_BYTES, 16)
            received.append(decode(data))
            for fd in fds:
                os.close(fd)
    assert isinstance(received[1], Listeners) and len(received[1].listeners) == 2
    assert isinstance(received[3], SessionRecord) and received[3].username == users[0].name.encode()
    proxy.wait_for_log("hand-over to pid 1 failed")
    proxy.wait_for_log("taken back; still serving")  # the ones sent: kept until READY
    for user in users:
        assert page(proxy.host, proxy.port, user.name, user.password)[0].startswith(REUSED)


def test_a_successor_still_there_that_fails_keeps_what_it_was_sent(
    start_proxy: Callable[..., ProxyProcess],
    make_user: Callable[..., User],
    dovecot: DovecotInstance,
) -> None:
    """A successor that took every session and answered SENT with something other than READY
    is still there and may have adopted them: the old process drops its copies (no LOGOUT)
    rather than share a session with it, and serves on with new ones."""
    proxy = start_proxy()
    users = cached_users(proxy, make_user, 2)
    with fake_successor(proxy) as sock:
        held: list[int] = []  # the sessions' copies: this successor keeps them open
        while True:  # HELLO, LISTENERS, KEY, the sessions, SENT
            data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE_BYTES, 16)
            held += fds
            if isinstance(decode(data), Marker):
                break
        try:
            sock.send(encode(Hello(FORMAT_VERSION, 1)))  # not READY
            proxy.wait_for_log("the 2 sessions sent dropped (the successor may have adopted them)")
            for user in users:
                assert not page(proxy.host, proxy.port, user.name, user.password)[0].startswith(
                    REUSED
                )
                # Dovecot's log process writes the login line a moment after the login
                assert wait_until(lambda user=user: dovecot.logins(user.name) == 2)
                assert dovecot.logouts(user.name) == 0
        finally:
            for fd in held:
                os.close(fd)


def connect_as(uid: int, path: Path) -> str:
    """Connect to the hand-over socket with effective uid ``uid`` and say HELLO: "closed" if
    the proxy closed the connection without a word."""
    script = (
        "import os, socket, sys\n"
        "os.setegid(int(sys.argv[1])); os.seteuid(int(sys.argv[1]))\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); s.settimeout(10)\n"
        "s.connect(sys.argv[2])\n"
        "try:\n"
        "    s.send(b'IPXH\\x01\\x00\\x01\\x00\\x00\\x00\\x01')\n"
        "    print('closed' if s.recv(100) == b'' else 'answered')\n"
        "except (ConnectionResetError, BrokenPipeError):\n    print('closed')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(uid), str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_a_connection_from_another_uid_is_refused(
    start_proxy: Callable[..., ProxyProcess], user: User
) -> None:
    """``SO_PEERCRED``: a proxy started as root serves only root on its hand-over socket, not
    another uid, nor its own service user (nobody, often shared), even with the socket file
    opened to everyone (the test, as root, connects with effective uid 1, then nobody's)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another uid (test_peer_check covers the check)")
    proxy = start_proxy()
    page(proxy.host, proxy.port, user.name, user.password)
    path = proxy.socket_path()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_uid == 0
    path.chmod(0o666)
    nobody = pwd.getpwnam("nobody").pw_uid
    for uid in (1, nobody):
        assert connect_as(uid, path) == "closed"  # without a word
        proxy.wait_for_log(f"hand-over: refused a connection from uid {uid} (only root)")
    assert "successor pid" not in proxy.log_text()
    assert page(proxy.host, proxy.port, user.name, user.password)[0].startswith(REUSED)


@dataclass
class PageResult:
    after: bool  # started once the old process had exited
    reused: bool


def imap_page(host: str, port: int, user: User) -> bool:
    """A webmail page with imaplib: connect, LOGIN, SELECT, FETCH, LOGOUT; True on reuse."""
    with imaplib.IMAP4(host, port, timeout=30) as imap:
        imap.login(user.name, user.password)
        reused = imaplib_reused(imap)
        assert imap.select("INBOX")[0] == "OK"
        typ, data = imap.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert typ == "OK" and f"{user.name} message 1".encode() in data[0][1]  # type: ignore[index,operator]
        imap.logout()
    return reused


LOAD_THREADS = 8
PAGES_AFTER = 15  # pages per thread once the old process is gone
MAX_PAGES = 400  # per thread: the bound of every loop


@pytest.mark.parametrize("workers", [1, 2])
def test_hand_over_under_load_fails_no_page_and_keeps_the_cache(
    start_proxy: Callable[..., ProxyProcess],
    make_user: Callable[..., User],
    dovecot: DovecotInstance,
    report_figure: Callable[[str], None],
    workers: int,
) -> None:
    """Pages at c=8 (one user per thread) while the proxy is replaced: none fails, and after
    the switch every login of a user whose session was cached is a reuse of it: Dovecot sees
    no new login once the old process is gone. With workers, each worker hands over in turn
    and the successor's workers take their own users' sessions."""
    proxy = start_proxy(cache_size=64, workers=workers)
    proxy.wait_for_log("normal server startup", timeout=20, count=workers)
    users = [make_user() for _ in range(LOAD_THREADS)]
    old_gone = threading.Event()
    results: list[list[PageResult]] = [[] for _ in users]
    failures: list[str] = []

    def pages(index: int) -> None:
        mine = results[index]
        while len(mine) < MAX_PAGES and sum(r.after for r in mine) < PAGES_AFTER:
            after = old_gone.is_set()
            try:
                mine.append(PageResult(after, imap_page(proxy.host, proxy.port, users[index])))
            except Exception as error:  # every failed page counts, whatever it is
                failures.append(f"{users[index].name}: {error!r}")
                return

    threads = [threading.Thread(target=pages, args=(i,)) for i in range(LOAD_THREADS)]
    for thread in threads:
        thread.start()
    assert wait_until(lambda: all(len(r) >= 5 for r in results) or bool(failures), timeout=60)
    started = time.monotonic()
    successor = proxy.successor().start(wait=False)
    try:
        assert proxy.process is not None and proxy.process.wait(timeout=60) == 0
        switch_s = time.monotonic() - started
        logins_at_switch = sum(dovecot.logins(u.name) for u in users)
        old_gone.set()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in threads)
        assert failures == []
        after = [r for mine in results for r in mine if r.after]
        assert len(after) >= LOAD_THREADS * PAGES_AFTER
        ratio = sum(r.reused for r in after) / len(after)
        assert ratio >= 0.99, ratio
        assert sum(dovecot.logins(u.name) for u in users) <= logins_at_switch + len(after) // 100
        total = sum(len(mine) for mine in results)
        done = re.findall(
            r"hand-over: done, ([0-9]+) sessions sent \(([0-9]+) checked in late\)",
            proxy.log_text(),
        )
        assert len(done) == workers  # each worker (or the one process) handed over
        if workers > 1:  # each told the others, which then served its users themselves
            assert proxy.log_text().count("none hands it a client any more") == workers
            assert "did not answer that worker" not in proxy.log_text()
        moved, late = (sum(int(d[i]) for d in done) for i in (0, 1))
        assert "not adopted" not in successor.log_text()  # the late ones too
        report_figure(
            f"hand-over under load (c={LOAD_THREADS}, workers {workers}): {total} pages, "
            f"0 failed; successor start to old exit {switch_s:.1f} s; {moved} sessions moved "
            f"({late} checked in late); reuse after it {ratio:.1%} of {len(after)} logins"
        )
    finally:
        old_gone.set()
        successor.stop()


# -- the pieces, without a proxy ------------------------------------------------------------------


def test_peer_check() -> None:
    """``SO_PEERCRED`` gives the connecting process's uid; only ours and root's are served."""
    ours, theirs = gsocket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        assert takeover.peer_uid(ours) == os.geteuid()
    assert takeover.peer_allowed(1000, own_uid=1000)  # a proxy that never was root
    assert takeover.peer_allowed(0, own_uid=1000)  # a successor started as root
    assert not takeover.peer_allowed(1001, own_uid=1000)
    assert not takeover.peer_allowed(65534, own_uid=0)
    # a proxy started as root and now nobody: only root, never its (shared) service user
    assert takeover.peer_allowed(0, own_uid=65534, root_only=True)
    assert not takeover.peer_allowed(65534, own_uid=65534, root_only=True)


@pytest.mark.parametrize(
    ("takeover_socket", "pidfile", "stat_filename", "path"),
    [
        (None, "/run/imapproxy.pid", "/var/run/pimpstats", "/run/imapproxy.pid.takeover"),
        (None, None, "/var/run/pimpstats", "/var/run/pimpstats.takeover"),
        (None, None, "", ""),
        ("/run/ipx.sock", "/run/imapproxy.pid", "", "/run/ipx.sock"),
        ("none", "/run/imapproxy.pid", "/var/run/pimpstats", ""),
    ],
)
def test_socket_path(
    takeover_socket: str | None, pidfile: str | None, stat_filename: str, path: str
) -> None:
    assert takeover.socket_path(takeover_socket, pidfile, stat_filename) == path


def test_descriptors_travel_without_blocking_the_hub() -> None:
    """``recv_fds``/``send_fds`` on gevent sockets wait cooperatively: another greenlet runs
    while one waits for a message, and a descriptor arrives usable."""
    left, right = gsocket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ticks: list[int] = []

    def ticker() -> None:
        for tick in range(5):
            ticks.append(tick)
            gevent.sleep(0.01)

    def sender() -> None:
        gevent.sleep(0.1)
        a, b = socket.socketpair()
        takeover.Channel(left).send(HasherKey(b"k"), [a.fileno()])
        a.close()
        b.sendall(b"through")
        b.close()

    greenlets = [gevent.spawn(ticker), gevent.spawn(sender)]
    message, fds = takeover.Channel(right).receive(timeout=5)
    assert ticks == [0, 1, 2, 3, 4] and message == HasherKey(b"k") and len(fds) == 1
    with gsocket.socket(fileno=fds[0]) as passed:
        assert passed.recv(100) == b"through"
    gevent.joinall(greenlets, timeout=5)
    left.close()
    right.close()


def test_a_received_message_that_is_not_ours_closes_its_descriptors() -> None:
    left, right = gsocket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with left, right:
        a, b = socket.socketpair()
        with a, b:
            socket.send_fds(left, [b"not a hand-over message"], [a.fileno()])
            with pytest.raises(TransferError, match="not a hand-over message"):
                takeover.Channel(right).receive(timeout=5)
            a.close()
            assert b.recv(10) == b""  # the received copy was closed: the peer sees the end


def test_under_systemd_the_successor_announces_its_pid_and_the_old_one_no_stop(
    start_proxy: Callable[..., ProxyProcess], user: User
) -> None:
    """sd_notify: the successor sends MAINPID=<pid> then READY=1 (NotifyAccess=all); the old
    process, whose service goes on, does not say STOPPING=1."""
    directory = Path(tempfile.mkdtemp(prefix="ipx-notify-"))
    directory.chmod(0o755)  # the proxy says READY=1 as nobody
    notify_path = str(directory / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    os.chmod(notify_path, 0o777)
    listener.settimeout(30)
    os.environ["NOTIFY_SOCKET"] = notify_path
    try:
        proxy = start_proxy()
        assert listener.recv(256) == b"READY=1"
        page(proxy.host, proxy.port, user.name, user.password)
        proxy.wait_for_log(f"LOGOUT: '{user.name}' from server sd")
        successor = proxy.successor().start(wait=False)
    finally:
        del os.environ["NOTIFY_SOCKET"]
    try:
        assert successor.process is not None
        assert listener.recv(256) == f"MAINPID={successor.process.pid}".encode()
        assert listener.recv(256) == b"READY=1"
        assert proxy.process is not None and proxy.process.wait(timeout=30) == 0
        listener.settimeout(0.5)
        with pytest.raises(TimeoutError):
            listener.recv(256)
        assert page(proxy.host, proxy.port, user.name, user.password)[0].startswith(REUSED)
    finally:
        successor.stop()
        listener.close()
        shutil.rmtree(directory, ignore_errors=True)


class IdleHandover:
    """What ``SuccessorWatch`` reads of a ``Handover``: nobody ever connects."""

    def __init__(self) -> None:
        self.done = gevent.event.Event()
        self.successor_pid = 0
        self.busy = False


def test_a_successor_started_directly_that_fails_is_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A proxy that was never root starts its successor itself (``spawn_directly``); one that
    exits 78 is logged with its status, and the proxy serves on."""
    watch = successor.SuccessorWatch(
        IdleHandover(),  # type: ignore[arg-type]
        lambda: successor.spawn_directly(("/bin/sh", "-c", "exit 78"), "/"),
    )
    with caplog.at_level(logging.INFO, logger="imapproxy"):
        watch.start()
        assert watch._watching is not None
        watch._watching.join(timeout=10)
    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith("SIGUSR2: started successor pid") for m in messages), messages
    assert any(
        re.fullmatch(
            r"successor pid [0-9]+ exited with status 78 before taking over; still serving", m
        )
        for m in messages
    ), messages


def test_routed_sessions_move_with_their_route(
    servers: dict[str, DovecotInstance], start_proxy: Callable[..., ProxyProcess], files: Path
) -> None:
    """The route is part of the cache key: after the hand-over each user's login, routed again
    by the successor, reuses the session on that user's own server."""
    a, b = servers["A"], servers["B"]
    routes = write_map(files / "routes", [f"alice {at(a)}", f"bob {at(b)} connect_timeout=7"])
    proxy = routed_proxy(start_proxy, None, route_map=routes)
    assert visit(proxy, "alice") == ("A", False)
    assert visit(proxy, "bob") == ("B", False)
    proxy.wait_for_log("LOGOUT: 'bob' from server sd")
    logins = {(s, u): servers[s].logins(u) for s in "AB" for u in ("alice", "bob")}
    successor = proxy.successor().start(wait=False)
    try:
        assert proxy.process is not None and proxy.process.wait(timeout=30) == 0
        assert visit(proxy, "alice") == ("A", True)
        assert visit(proxy, "bob") == ("B", True)
        assert {(s, u): servers[s].logins(u) for s in "AB" for u in ("alice", "bob")} == logins
        dump = b"".join(admin(successor, b"XPROXY_DUMPICC"))
        assert f" alice Cached {at(a)}\r\n".encode() in dump, dump
        assert f" bob Cached {at(b)}\r\n".encode() in dump, dump
    finally:
        successor.stop()


def test_the_select_cache_entry_moves_with_its_session(
    start_proxy: Callable[..., ProxyProcess], user: User
) -> None:
    """A session cached with its mailbox selected and the SELECT reply kept: after the
    hand-over the page's SELECT is answered from that entry (a hit), and with the server's
    ``* OK [CLOSED]`` line, learnt by the old process on the second page (a hit needs it)."""
    proxy = start_proxy(enable_select_cache=True)
    for count in (1, 2):
        page(proxy.host, proxy.port, user.name, user.password)
        proxy.wait_for_log(f"LOGOUT: '{user.name}' from server sd", count=count)
    assert proxy.counters().SelectCacheHits == 0
    successor = proxy.successor().start(wait=False)
    try:
        assert proxy.process is not None and proxy.process.wait(timeout=30) == 0
        assert successor.counters().SelectCacheHits == 0
        assert page(proxy.host, proxy.port, user.name, user.password)[0].startswith(REUSED)
        assert successor.counters().SelectCacheHits == 1
    finally:
        successor.stop()


def test_a_moved_session_keeps_the_time_it_had_left(
    start_proxy: Callable[..., ProxyProcess], user: User
) -> None:
    """Expiry travels as the time left: a session cached 3 s before the hand-over of a 6 s
    cache expires about 3 s after it in the successor, not 6."""
    proxy = start_proxy(cache_expiration_time=6)
    page(proxy.host, proxy.port, user.name, user.password)
    proxy.wait_for_log(f"LOGOUT: '{user.name}' from server sd")
    time.sleep(3)
    started = time.monotonic()
    successor = proxy.successor().start(wait=False)
    try:
        successor.wait_for_log("hand-over: 1 of 1 sessions adopted", timeout=30)
        successor.wait_for_log("Expiring server sd", timeout=10)
        assert time.monotonic() - started < 5.5
    finally:
        successor.stop()


def test_a_session_checked_in_while_the_old_process_finishes_moves_too(
    start_proxy: Callable[..., ProxyProcess], user: User, dovecot: DovecotInstance
) -> None:
    """A client active during the hand-over stays with the old process to its end; when it
    logs out, its session goes to the successor, and the user's next login reuses it."""
    proxy = start_proxy()
    client, _ = logged_in(proxy.host, proxy.port, user.name, user.password)
    successor = proxy.successor().start(wait=False)
    try:
        proxy.wait_for_log("is serving with 0 sessions from here", timeout=30)
        assert client.command(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
        client.command(b"z", b"LOGOUT")
        client.close()
        assert proxy.process is not None and proxy.process.wait(timeout=30) == 0
        assert "hand-over: done, 1 sessions sent (1 checked in late)" in proxy.log_text()
        logins = dovecot.logins(user.name)
        replies = page(proxy.host, proxy.port, user.name, user.password)
        assert replies[0].startswith(REUSED), successor.log_text()
        assert dovecot.logins(user.name) == logins
    finally:
        successor.stop()


def test_with_hand_overs_off_sigusr2_is_ignored(
    start_proxy: Callable[..., ProxyProcess], user: User
) -> None:
    proxy = start_proxy(takeover_socket="none")
    page(proxy.host, proxy.port, user.name, user.password)
    assert not proxy.socket_path().exists()
    assert proxy.process is not None
    proxy.process.send_signal(signal.SIGUSR2)
    proxy.wait_for_log("SIGUSR2 ignored: hand-overs are off")
    assert page(proxy.host, proxy.port, user.name, user.password)[0].startswith(REUSED)


MANY_SESSIONS = 100


def test_a_hundred_cached_sessions_move_and_are_reused(
    start_proxy: Callable[..., ProxyProcess],
    user: User,
    dovecot: DovecotInstance,
    report_figure: Callable[[str], None],
) -> None:
    """Many sessions of one user (logged in at once, then out): all move, and as many logins
    at once afterwards all reuse them; Dovecot sees no new login."""
    proxy = start_proxy(cache_size=MANY_SESSIONS + 8)
    clients = [
        logged_in(proxy.host, proxy.port, user.name, user.password)[0] for _ in range(MANY_SESSIONS)
    ]
    for client in clients:
        client.command(b"z", b"LOGOUT")
        client.close()
    proxy.wait_for_log(f"LOGOUT: '{user.name}' from server sd", count=MANY_SESSIONS)
    logins = dovecot.logins(user.name)
    successor = proxy.successor().start(wait=False)
    try:
        assert proxy.process is not None and proxy.process.wait(timeout=60) == 0
        took = re.search(
            rf"is serving with {MANY_SESSIONS} sessions from here \(([0-9]+) ms after HELLO\)",
            proxy.log_text(),
        )
        assert took is not None, proxy.log_text()
        again = [
            logged_in(proxy.host, proxy.port, user.name, user.password)
            for _ in range(MANY_SESSIONS)
        ]
        assert all(replies[0].startswith(REUSED) for _, replies in again)
        for client, _ in again:
            client.close()
        assert dovecot.logins(user.name) == logins
        report_figure(
            f"hand-over of {MANY_SESSIONS} cached sessions: {took[1]} ms from the successor's "
            "HELLO to its READY (listeners, key, sessions sent and adopted, accepting)"
        )
    finally:
        successor.stop()


def test_workers_hand_over_to_a_successor_with_another_number_of_workers(
    make_user: Callable[..., User], dovecot: DovecotInstance
) -> None:
    """workers 2, then SIGUSR2 with the file saying workers 3: each old worker hands over in
    turn, each new worker adopts its own users' sessions (the owners change with N), and every
    user's next login is a reuse of the very session Dovecot opened before."""
    # room for every user in any one worker (each has cache_size / workers): the owners
    # of 8 users among 3 workers are as uneven as their names make them
    proxy = ProxyProcess(
        Path(tempfile.mkdtemp(prefix="ipx-workers-")), dovecot, workers=2, cache_size=48
    )
    pidfile = proxy.root / "imapproxy.pid"
    proxy.args = ["-p", str(pidfile)]
    proxy.start()
    assert proxy.process is not None
    old_pid, successor_pid = proxy.process.pid, 0
    users = [make_user(messages=1) for _ in range(8)]
    try:
        proxy.wait_for_log("normal server startup", timeout=20, count=2)
        for user in users:
            assert not page(proxy.host, proxy.port, user.name, user.password)[0].startswith(REUSED)
        sessions = {user.name: session_ids(dovecot, user.name) for user in users}
        assert all(len(ids) == 1 for ids in sessions.values())
        proxy.config_path.write_text(proxy.config_path.read_text() + "workers 3\n")
        proxy.process.send_signal(signal.SIGUSR2)
        assert exit_code(proxy, timeout=60) == 0
        successor_pid = read_pid(pidfile, old_pid)
        log = proxy.log_text()
        assert log.count("handed over and finished") == 2
        for user in users:
            reply = page(proxy.host, proxy.port, user.name, user.password)[0]
            assert reply.startswith(REUSED), proxy.log_text()[-5000:]
            assert session_ids(dovecot, user.name) == sessions[user.name]

        def adopted() -> list[str]:  # one line per new worker, written as each starts
            return re.findall(r"hand-over: ([0-9]+) of [0-9]+ sessions adopted", proxy.log_text())

        assert wait_until(lambda: len(adopted()) == 3, timeout=20)
        assert sum(int(a) for a in adopted()) == len(users)
    finally:
        end_both(proxy, successor_pid)


def test_only_a_closed_connection_means_the_successor_is_gone() -> None:
    assert takeover.peer_gone(takeover.PeerClosed("closed"))
    assert takeover.peer_gone(BrokenPipeError()) and takeover.peer_gone(ConnectionResetError())
    assert not takeover.peer_gone(TransferError("nothing came within 30.0 s"))
    assert not takeover.peer_gone(TransferError("expected READY, got Hello"))
    assert not takeover.peer_gone(TimeoutError())

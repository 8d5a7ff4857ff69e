"""Running as a system service: daemon, privileges, chroot, signals, systemd, init script, install.

Most of these need root (as the test machines are) and are skipped otherwise.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.client import REUSED, page
from tests.support.dovecot import DovecotInstance, User, free_port, wait_for_port
from tests.support.polling import wait_until
from tests.support.proxy import REPO, ProxyProcess, run_imapproxyd, write_config

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
NOBODY = 65534


def gone(pid: int) -> bool:
    """Exited (a zombie counts: this container's init may not reap orphans at once)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\nState:\tZ" in status


@pytest.fixture
def service_dir() -> Iterator[Path]:
    """A directory the service user can read (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="ipx-service-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def daemon_config(directory: Path, dovecot: DovecotInstance, **extra: object) -> Path:
    settings: dict[str, object] = {
        "server_hostname": dovecot.host,
        "server_port": dovecot.port,
        "listen_address": "127.0.0.1",
        "listen_port": free_port(),
        "proc_username": "nobody",
        "proc_groupname": "nogroup",
        "stat_filename": directory / "pimpstats",
        "protocol_log_filename": directory / "trace",
        "cache_expiration_time": 300,
    }
    settings.update(extra)
    path = write_config(directory / "imapproxy.conf", settings)
    path.chmod(0o644)
    return path


def port_of(config: Path) -> int:
    return int(
        next(
            line.split()[1]
            for line in config.read_text().splitlines()
            if line.startswith("listen_port")
        )
    )


def start_daemon(config: Path, pidfile: Path) -> int:
    started = time.monotonic()
    run = run_imapproxyd("-f", str(config), "-p", str(pidfile))
    assert run.returncode == 0, run.stderr
    assert time.monotonic() - started < 10  # it detached: the shell got its prompt back
    assert wait_until(pidfile.exists)
    pid = int(pidfile.read_text())
    wait_for_port("127.0.0.1", port_of(config))
    return pid


def status_of(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def reused(port: int, user: User) -> bool:
    """One webmail page; True if the backend session was reused."""
    return page("127.0.0.1", port, user.name, user.password)[0].startswith(REUSED)


@root_only
def test_daemon_detaches_drops_privileges_chroots_reloads_and_stops(
    service_dir: Path, dovecot: DovecotInstance, make_user: Callable[..., User]
) -> None:
    chroot = service_dir / "chroot"
    chroot.mkdir()
    config = daemon_config(service_dir, dovecot, chroot_directory=chroot)
    pidfile = service_dir / "imapproxy.pid"
    pid = start_daemon(config, pidfile)
    try:
        # the pid file is written as root, just before the drop: wait for it to be done
        assert wait_until(lambda: status_of(pid)["NoNewPrivs"].strip() == "1", timeout=5)
        status = status_of(pid)
        assert status["Uid"].split() == [str(NOBODY)] * 4
        assert status["Groups"].strip() == ""
        assert os.readlink(f"/proc/{pid}/root") == str(chroot)
        assert os.getppid() != int(status["PPid"])  # detached from us
        for name in ("pimpstats", "trace"):
            info = (service_dir / name).stat()
            assert (info.st_uid, info.st_mode & 0o777) == (NOBODY, 0o600)
        user, port = make_user(), port_of(config)
        assert not reused(port, user)
        assert reused(port, user)

        # SIGHUP: the file is read inside the chroot; expiry changes live, sessions survive
        inside = chroot / str(config).lstrip("/")
        inside.parent.mkdir(parents=True)
        inside.write_text(
            config.read_text().replace("cache_expiration_time 300", "cache_expiration_time 2")
        )
        logouts = dovecot.logouts(user.name)
        os.kill(pid, signal.SIGHUP)
        time.sleep(0.5)
        assert reused(port, user)  # the session cached before the reload is still there
        assert wait_until(lambda: dovecot.logouts(user.name) == logouts + 1, timeout=6)

        # SIGTERM: cached sessions are logged out, the process exits within the bound
        assert not reused(port, user)
        logouts = dovecot.logouts(user.name)
        os.kill(pid, signal.SIGTERM)
        assert wait_until(lambda: gone(pid), timeout=15)
        assert wait_until(lambda: dovecot.logouts(user.name) == logouts + 1)
    finally:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)


@root_only
def test_root_without_proc_username_is_refused(service_dir: Path, dovecot: DovecotInstance) -> None:
    config = daemon_config(
        service_dir, dovecot, proc_username="", proc_groupname="", foreground_mode=True
    )
    run = run_imapproxyd("-f", str(config), timeout=30)
    assert run.returncode == 71
    assert "proc_username is not set: refusing to run as root" in run.stderr


def limited(soft: int, hard: int) -> list[str]:
    """Run with these open-file limits, and without CAP_SYS_RESOURCE (root could raise them)."""
    return ["setpriv", "--bounding-set=-sys_resource", "prlimit", f"--nofile={soft}:{hard}"]


@root_only
def test_file_limit_too_low_for_cache_size(service_dir: Path, dovecot: DovecotInstance) -> None:
    config = daemon_config(service_dir, dovecot, foreground_mode=True, cache_size=1000)
    run = run_imapproxyd("-f", str(config), prefix=limited(256, 256), timeout=30)
    assert run.returncode == 71, run.stderr
    assert "cache_size 1000 needs 2064 open files, but the limit is 256" in run.stderr


@root_only
def test_file_limit_raised_for_a_big_cache(service_dir: Path, dovecot: DovecotInstance) -> None:
    config = daemon_config(service_dir, dovecot, cache_size=2000)
    pidfile = service_dir / "pid"
    run = run_imapproxyd("-f", str(config), "-p", str(pidfile), prefix=limited(1024, 8192))
    assert run.returncode == 0, run.stderr
    assert wait_until(pidfile.exists)
    pid = int(pidfile.read_text())
    try:
        limits = Path(f"/proc/{pid}/limits").read_text()
        line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
        assert line.split()[3:5] == ["4064", "8192"]  # 2 per slot and 64 spare
    finally:
        os.kill(pid, signal.SIGTERM)
        assert wait_until(lambda: gone(pid), timeout=15)


def test_sd_notify_sighup_and_sigusr1(
    start_proxy: Callable[..., ProxyProcess], service_dir: Path, user: User
) -> None:
    notify_path = str(service_dir / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    os.chmod(notify_path, 0o777)  # as systemd's: the proxy has become nobody when it is ready
    listener.settimeout(30)
    os.environ["NOTIFY_SOCKET"] = notify_path
    try:
        proxy = start_proxy()
    finally:
        del os.environ["NOTIFY_SOCKET"]
    try:
        assert listener.recv(256) == b"READY=1"
        assert not reused(proxy.port, user)
        assert proxy.process is not None
        proxy.process.send_signal(signal.SIGUSR1)
        proxy.wait_for_log("counters: clients 0 (peak 1), active 0 (peak 1), cached 1 (peak 1)")
        text = proxy.config_path.read_text()
        proxy.config_path.write_text(text + "cache_size 7\nclient_idle_timeout 99\n")
        proxy.process.send_signal(signal.SIGHUP)
        proxy.wait_for_log("reload: client_idle_timeout changed")
        proxy.wait_for_log("reload: cache_size changed in the file; this needs a restart")
        assert reused(proxy.port, user)  # cached sessions survive a reload
        proxy.config_path.write_text(text + "cache_size nonsense\n")
        proxy.process.send_signal(signal.SIGHUP)
        proxy.wait_for_log("reload failed, running settings kept: ")
        assert reused(proxy.port, user)
        proxy.stop()
        assert listener.recv(256) == b"STOPPING=1"
    finally:
        listener.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_signals_the_parent_blocked_still_reach_the_proxy(
    service_dir: Path, dovecot: DovecotInstance, workers: int
) -> None:
    """A mask is inherited across exec, and a parent may have blocked signals (a supervisor
    that takes its own with ``sigtimedwait``, say): SIGHUP still reloads, SIGTERM still stops."""
    proxy = ProxyProcess(service_dir / "proxy", dovecot, workers=workers)
    blocked = {signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1}
    proxy.preexec_fn = lambda: signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    proxy.start()
    try:
        proxy.wait_for_log("normal server startup", timeout=20, count=workers)
        assert proxy.process is not None
        proxy.config_path.write_text(proxy.config_path.read_text() + "client_idle_timeout 99\n")
        proxy.process.send_signal(signal.SIGHUP)
        proxy.wait_for_log("reload: client_idle_timeout changed", timeout=20, count=workers)
        assert proxy.stop(timeout=15) == 0
    finally:
        proxy.stop()


def test_a_sighup_while_the_workers_start_kills_none_of_them(
    service_dir: Path, dovecot: DovecotInstance
) -> None:
    """The supervisor passes SIGHUP on to its workers at once. A worker that has no handler
    yet (forked, building its proxy) holds the signal until it serves, and reloads then: the
    signal's default action would have ended it."""
    proxy = ProxyProcess(service_dir / "proxy", dovecot, workers=2)
    proxy.start(wait=False)
    try:
        assert proxy.process is not None
        deadline = time.monotonic() + 20  # as soon as the last worker is forked
        while "supervisor: worker 1 started" not in proxy.log_text():
            assert time.monotonic() < deadline, proxy.log_text()
            time.sleep(0.001)
        proxy.process.send_signal(signal.SIGHUP)
        proxy.wait_for_log("normal server startup", timeout=20, count=2)
        proxy.wait_for_log("reload: nothing changed", timeout=20, count=2)
        assert "killed by signal" not in proxy.log_text()
        assert proxy.stop(timeout=15) == 0
    finally:
        proxy.stop()


# -- installation, unit, init script ---------------------------------------------------------------


@pytest.fixture(scope="module")
def installed() -> Iterator[Path]:
    """``make install install-conf install-init`` into a staging directory."""
    destdir = Path(tempfile.mkdtemp(prefix="ipx-install-"))
    os.chmod(destdir, 0o755)
    for target in ("install", "install-conf", "install-init"):
        run = subprocess.run(
            ["make", "-s", target, f"DESTDIR={destdir}", f"PYTHON={sys.executable}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, run.stderr
    yield destdir
    shutil.rmtree(destdir, ignore_errors=True)


def test_installed_commands_work(installed: Path) -> None:
    sbin = installed / "usr/local/sbin"
    conf = installed / "etc/imapproxy.conf"
    for command in (sbin / "in.imapproxyd", sbin / "imapproxyd"):
        run = subprocess.run(
            [str(command), "-f", str(conf), "--check-config"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        assert "listen_port 1143\n" in run.stdout
    run = subprocess.run(
        [str(installed / "usr/local/bin/pimpstat"), "-h"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0 and "pimpstat" in run.stdout


def test_install_conf_keeps_an_existing_file(installed: Path) -> None:
    conf = installed / "etc/imapproxy.conf"
    conf.write_text(conf.read_text() + "# local change\n")
    run = subprocess.run(
        ["make", "-s", "install-conf", f"DESTDIR={installed}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0 and "left as it is" in run.stdout
    assert conf.read_text().endswith("# local change\n")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_unit_verifies(installed: Path) -> None:
    unit = installed / "lib/systemd/system/imapproxy.service"
    text = unit.read_text()
    assert (
        "Type=notify" in text and "NoNewPrivileges=yes" in text and "ProtectSystem=strict" in text
    )
    assert "ExecStart=/usr/local/sbin/in.imapproxyd -f /etc/imapproxy.conf --foreground" in text
    # verify with the ExecStart path pointing at the staged binary (verify checks it exists)
    staged = installed / "imapproxy.service"
    staged.write_text(text.replace("/usr/local/sbin/", f"{installed}/usr/local/sbin/"))
    run = subprocess.run(
        ["systemd-analyze", "verify", str(staged)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert "imapproxy.service" not in run.stderr  # no complaint about our unit


def test_init_script_syntax(installed: Path) -> None:
    script = installed / "etc/init.d/imapproxy"
    assert subprocess.run(["sh", "-n", str(script)], timeout=30).returncode == 0
    if shutil.which("checkbashisms"):
        run = subprocess.run(
            ["checkbashisms", str(script)], capture_output=True, text=True, timeout=30
        )
        assert run.returncode == 0, run.stdout + run.stderr


@root_only
def test_init_script_start_status_stop(
    installed: Path, service_dir: Path, dovecot: DovecotInstance, user: User
) -> None:
    config = daemon_config(service_dir, dovecot)
    pidfile = service_dir / "imapproxy.pid"
    defaults = service_dir / "defaults"
    defaults.write_text(
        f"DAEMON={installed}/usr/local/sbin/in.imapproxyd\nCONFIG={config}\nPIDFILE={pidfile}\n"
    )
    script = str(installed / "etc/init.d/imapproxy")
    env = dict(os.environ, IMAPPROXY_DEFAULTS=str(defaults))

    def init(action: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", script, action], env=env, capture_output=True, text=True, timeout=60
        )

    assert init("status").returncode == 3  # not running
    assert init("start").returncode == 0
    try:
        assert wait_until(pidfile.exists)
        wait_for_port("127.0.0.1", port_of(config))
        assert init("status").returncode == 0
        assert not reused(port_of(config), user)
        assert init("reload").returncode == 0
        assert reused(port_of(config), user)
        old_pid = pidfile.read_text().strip()
        upgrade = init("upgrade")  # a new process takes the cached session over
        assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
        assert wait_until(lambda: pidfile.read_text().strip() != old_pid)
        assert wait_until(lambda: not Path(f"/proc/{old_pid}").exists(), timeout=30)
        assert init("status").returncode == 0
        assert reused(port_of(config), user)
    finally:
        stop = init("stop")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert not pidfile.exists()
    assert init("status").returncode == 3

"""Running the real ``imapproxyd`` as a subprocess in front of a test Dovecot."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from imapproxy import stats
from tests.support.dovecot import DovecotInstance, free_port, wait_for_port

REPO = Path(__file__).resolve().parents[2]


def run_imapproxyd(
    *args: str, timeout: float = 60, prefix: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m imapproxy ARGS`` to its end (under ``prefix``, e.g. ``prlimit ...``);
    its output as text."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", "imapproxy", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def service_identity() -> dict[str, str]:
    """As root the proxy must drop privileges (as up-imapproxy): run it as nobody."""
    return {"proc_username": "nobody", "proc_groupname": "nogroup"} if os.geteuid() == 0 else {}


def write_config(path: Path, settings: dict[str, Any]) -> Path:
    lines = []
    for key, value in settings.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "yes" if value else "no"
        lines.append(f"{key} {value}\n")
    path.write_text("".join(lines))
    return path


class ProxyProcess:
    """``python -m imapproxy -f <conf> --foreground`` with its stderr in a file."""

    def __init__(
        self, root: Path, backend: DovecotInstance | tuple[str, int], **settings: Any
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)
        host, port = (
            (backend.host, backend.port) if isinstance(backend, DovecotInstance) else backend
        )
        self.host = "127.0.0.1"
        self.port = free_port()
        self.stat_path = root / "pimpstats"
        self.trace_path = root / "trace.log"
        self.log_path = root / "proxy.log"
        self.settings: dict[str, Any] = {
            "server_hostname": host,
            "server_port": port,
            "listen_address": self.host,
            "listen_port": self.port,
            "cache_size": 16,
            "cache_expiration_time": 300,
            "connect_retries": 2,
            "connect_delay": 1,
            "stat_filename": self.stat_path,
            "protocol_log_filename": self.trace_path,
            "foreground_mode": True,
            **service_identity(),
        }
        self.settings.update(settings)
        self.config_path = write_config(root / "imapproxy.conf", self.settings)
        self.process: subprocess.Popen[bytes] | None = None
        self.args: list[str] = []  # more options (-p PIDFILE, --take-over)
        self.preexec_fn: Callable[[], object] | None = None  # run in the child before exec

    def start(self, wait: bool = True) -> ProxyProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "imapproxy",
                    "-f",
                    str(self.config_path),
                    "--foreground",
                    *self.args,
                ],
                cwd=REPO,
                stdout=log,
                stderr=log,
                env=env,
                preexec_fn=self.preexec_fn,
            )
        if wait:
            try:
                wait_for_port(self.host, self.port, timeout=30)
            except TimeoutError:
                self.stop()
                raise RuntimeError(f"proxy did not start:\n{self.log_text()}") from None
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code = self.process.returncode
        self.process = None
        return code

    def socket_path(self) -> Path:
        """The hand-over socket: by default beside the pid file, else the statistics file."""
        if self.settings.get("takeover_socket") not in (None, "none"):
            return Path(self.settings["takeover_socket"])
        base = self.args[self.args.index("-p") + 1] if "-p" in self.args else self.stat_path
        return Path(f"{base}.takeover")

    def successor(self, log_name: str = "successor.log") -> ProxyProcess:
        """Another process on the same configuration, started with ``--take-over`` (not yet
        started; its log in a file of its own)."""
        successor = ProxyProcess.__new__(ProxyProcess)
        successor.__dict__.update(self.__dict__)
        successor.process = None
        successor.log_path = self.root / log_name
        successor.args = [*self.args, "--take-over"]
        return successor

    def counters(self) -> stats.Counters:
        """A snapshot of the proxy's statistics file."""
        counters = stats.read_file(str(self.stat_path))
        assert counters is not None, f"no statistics file at {self.stat_path}"
        return counters

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 10, count: int = 1) -> str:
        """Wait until ``text`` is in the log ``count`` times (or more)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log_text()
            if log.count(text) >= count:
                return log
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in proxy log:\n{self.log_text()}")

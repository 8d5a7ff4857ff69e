"""A private HAProxy (Debian ``haproxy``) in TCP mode on loopback, from a config in a temp dir.

Each route is a frontend (on 127.0.0.1, or ::1) on a free port passing connections, from ``SOURCE``,
to a target with a PROXY protocol
header (``send-proxy``: v1, ``send-proxy-v2``: v2), optionally health-checked with a header of
its own (``check-send-proxy``: v2 sends the LOCAL command) and an expected greeting.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.dovecot import free_port, wait_for_port
from tests.support.polling import wait_until
from tests.support.processes import terminate

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"

GLOBAL = """\
global
  maxconn 200
  stats socket {root}/admin.sock mode 600 level admin
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
"""

ROUTE = """\
frontend {name}_in
  bind {bind}:{port}
  default_backend {name}_out
backend {name}_out
{check_options}  server target {target_host}:{target_port} source {source} {send} {check}
"""

SOURCE = "127.0.0.3"  # HAProxy's address towards its targets: the one they trust

CHECK_OPTIONS = """\
  option tcp-check
  tcp-check expect rstring ^\\*\\ OK
"""


@dataclass
class Route:
    name: str
    target: tuple[str, int]
    send: str  # "send-proxy" or "send-proxy-v2"
    checked: bool = False
    bind: str = "127.0.0.1"  # or "::1": the header then says TCP6
    port: int = 0


class HAProxyInstance:
    def __init__(self, root: Path, routes: list[Route]) -> None:
        self.root, self.routes = root, {route.name: route for route in routes}
        for route in routes:
            route.port = free_port(route.bind)
        self.config_path = root / "haproxy.cfg"
        self.process: subprocess.Popen[bytes] | None = None

    def port(self, name: str) -> int:
        return self.routes[name].port

    def write_config(self) -> None:
        parts = [GLOBAL.format(root=self.root)]
        for route in self.routes.values():
            parts.append(
                ROUTE.format(
                    name=route.name,
                    bind=f"ipv6@{route.bind}" if ":" in route.bind else route.bind,
                    port=route.port,
                    target_host=route.target[0],
                    target_port=route.target[1],
                    send=route.send,
                    source=SOURCE,
                    check="check inter 300ms check-send-proxy" if route.checked else "",
                    check_options=CHECK_OPTIONS if route.checked else "",
                )
            )
        self.config_path.write_text("".join(parts))

    def start(self) -> HAProxyInstance:
        self.write_config()
        check = subprocess.run(
            [HAPROXY, "-c", "-f", str(self.config_path)], capture_output=True, timeout=30
        )
        assert check.returncode == 0, check.stdout + check.stderr
        self.process = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for route in self.routes.values():
            wait_for_port(route.bind, route.port)
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        terminate(self.process)
        self.process = None

    def admin(self, command: str) -> str:
        """A command on HAProxy's stats socket (``show stat``...)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.root / "admin.sock"))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_status(self, name: str, field: str = "status") -> str:
        """A field of a route's target in ``show stat``: ``status`` (UP, DOWN, ...),
        ``check_status`` (L7OK: the last check got the expected reply), ..."""
        lines = self.admin("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == f"{name}_out" and row.get("svname") == "target":
                return row[field]
        raise AssertionError(f"no server for route {name}")

    def wait_status(
        self, name: str, status: str, field: str = "status", timeout: float = 10
    ) -> None:
        reached = wait_until(lambda: self.server_status(name, field).startswith(status), timeout)
        assert reached, f"{name}: {self.server_status(name, field)}, not {status}"


@contextlib.contextmanager
def running_haproxy(routes: list[Route]) -> Iterator[HAProxyInstance]:
    root = Path(tempfile.mkdtemp(prefix="ipx-haproxy-"))
    instance = HAProxyInstance(root, routes)
    try:
        yield instance.start()
    finally:
        instance.stop()
        shutil.rmtree(root, ignore_errors=True)

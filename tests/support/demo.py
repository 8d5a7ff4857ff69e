"""``make demo``: a private Dovecot with demo users on loopback, and imapproxy in front of it.

Everything lives in a fresh directory under /tmp (printed at start); Ctrl-C stops the proxy and
Dovecot and leaves the directory for inspection.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.support.dovecot import DovecotInstance, free_port, make_message
from tests.support.proxy import REPO, service_identity, write_config

DEMO_USERS = {"demo": "demo", "alice": "alice-pw", "bob": "bob-pw"}
PREFERRED_PORT = 1143  # Debian's listen_port when the IMAP server is on the same host


def pick_port() -> int:
    try:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", PREFERRED_PORT))
        return PREFERRED_PORT
    except OSError:
        return free_port()


def start_dovecot(root: Path) -> DovecotInstance:
    dovecot = DovecotInstance(root / "dovecot")
    (root / "dovecot").mkdir()
    os.chmod(root / "dovecot", 0o755)
    dovecot.write_config()
    for name, password in DEMO_USERS.items():
        dovecot.add_user(name, password)
    dovecot.start()
    for name in DEMO_USERS:
        for number, subject in enumerate(
            ["Welcome to imapproxy", "Your weekly report", "Lunch on Friday?"], start=1
        ):
            dovecot.deliver(name, make_message(f"{subject} ({name} #{number})"))
    return dovecot


def proxy_config(root: Path, dovecot: DovecotInstance, port: int) -> Path:
    return write_config(
        root / "imapproxy.conf",
        {
            "server_hostname": dovecot.host,
            "server_port": dovecot.port,
            "listen_address": "127.0.0.1",
            "listen_port": port,
            "cache_size": 64,
            "cache_expiration_time": 300,
            "foreground_mode": True,
            "stat_filename": root / "pimpstats",
            "protocol_log_filename": root / "protocol.log",
            "enable_admin_commands": True,
            **service_identity(),
            "enable_select_cache": True,
        },
    )


def instructions(conf: Path, port: int) -> str:
    users = ", ".join(f"{name}/{password}" for name, password in DEMO_USERS.items())
    return f"""
imapproxy demo
  proxy:   127.0.0.1 port {port}  (config {conf})
  users:   {users}
  try:     python3 -c "import imaplib; m = imaplib.IMAP4('127.0.0.1', {port}); \\
           print(m.login('demo', 'demo')); print(m.select()); print(m.logout())"
           (run it twice: the second login says [XPROXYREUSE])
  watch:   {sys.executable} -m pimpstat.app -f {conf}
  admin:   printf 'a XPROXY_DUMPICC\\r\\nb LOGOUT\\r\\n' | python3 -c \\
           "import socket,sys; s=socket.create_connection(('127.0.0.1',{port})); \\
           s.sendall(sys.stdin.buffer.read()); import time; time.sleep(0.3); print(s.recv(4096).decode())"
  stop:    Ctrl-C
"""


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    root = Path(tempfile.mkdtemp(prefix="imapproxy-demo-"))
    os.chmod(root, 0o755)
    dovecot = start_dovecot(root)
    port = pick_port()
    conf = proxy_config(root, dovecot, port)
    print(instructions(conf, port), flush=True)
    proxy = subprocess.Popen(
        [sys.executable, "-m", "imapproxy", "-f", str(conf), "--foreground"], cwd=REPO
    )
    try:
        return proxy.wait()
    except KeyboardInterrupt:
        proxy.send_signal(signal.SIGTERM)
        return proxy.wait(timeout=30)
    finally:
        dovecot.stop()
        print(f"demo stopped; files left in {root}")


if __name__ == "__main__":
    raise SystemExit(main())

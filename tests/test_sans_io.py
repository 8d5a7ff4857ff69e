"""The sans-I/O modules import nothing that does I/O or reads the clock."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "imapproxy"
SANS_IO = [
    *sorted((PACKAGE / "protocol").glob("*.py")),
    *(
        PACKAGE / name
        for name in (
            "cache.py",
            "session.py",
            "backend_login.py",
            "credentials.py",
            "select_cache.py",
            "redact.py",
            "throttle.py",
            "relay_state.py",
            "reuse_check.py",
            "tls_status.py",
            "forwarding.py",
            "route.py",
            "health.py",
            "affinity.py",
            "worker_message.py",
            "session_transfer.py",
        )
    ),
    PACKAGE.parent / "pimpstat" / "view.py",
]
FORBIDDEN = {"gevent", "socket", "ssl", "time", "select", "selectors", "asyncio", "threading"}
FORBIDDEN |= {"io", "mmap", "datetime", "curses", "cursesmenu"}
# os is allowed where it is used for os.urandom (credentials); a view has no business with it
ALSO_FORBIDDEN = {"view.py": {"os"}}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", SANS_IO, ids=lambda p: p.name)
def test_no_io_imports(path: Path) -> None:
    assert not imported_modules(path) & (FORBIDDEN | ALSO_FORBIDDEN.get(path.name, set()))

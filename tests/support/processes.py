"""Ending the servers the fixtures start: the one way they wait for a child, then kill it."""

from __future__ import annotations

import subprocess


def reap(process: subprocess.Popen[bytes], timeout_s: float = 10) -> None:
    """Wait for a process told to stop; kill it if it is still there after ``timeout_s``.
    Its stderr pipe, if any, is closed (a pipe left open warns in a later test)."""
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.stderr is not None:
        process.stderr.close()


def terminate(process: subprocess.Popen[bytes], timeout_s: float = 10) -> None:
    """SIGTERM, then ``reap``."""
    process.terminate()
    reap(process, timeout_s)

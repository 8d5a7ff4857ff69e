"""Starting a successor on SIGUSR2 (nginx's binary upgrade), and telling the log what came of it.

The successor is this program's command line, read from disk again, plus ``--take-over``
(``takeover`` does the hand-over itself). It must start as root, as the proxy did: when the
proxy dropped privileges, its privileged reader (``keeper``), which stayed root, starts it;
a proxy that was never root starts it as its own child. Either way its exit status is
watched, so that a successor that fails (78: a bad configuration; 69: the IMAP server or the
running proxy unreachable) is reported in the running proxy's log, which serves on.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import gevent

from imapproxy import keeper

if TYPE_CHECKING:
    from imapproxy.takeover import Handover

LOGGER = logging.getLogger("imapproxy")

# A successor first checks its configuration and reaches the IMAP server (connect_retries
# rounds connect_delay apart) before it connects to the running proxy.
SUCCESSOR_START_TIMEOUT_S = 120.0
STATUS_POLL_S = 0.2


def command() -> tuple[str, ...]:
    """This program's command line, from disk again, with ``--take-over``."""
    argv = [sys.executable, *sys.orig_argv[1:]]
    if "--take-over" not in argv:
        argv.append("--take-over")
    return tuple(argv)


StatusOf = Callable[[], int | None]  # the successor's exit status, None while it runs
_UNWAITED: list[object] = []  # the supervisor's successors (one per SIGUSR2 that started one)


class SuccessorWatch:
    """Starts a successor and reports in the log what became of it."""

    def __init__(self, handover: Handover, start: Callable[[], tuple[int, StatusOf]]) -> None:
        self.handover, self._start = handover, start
        self._watching: gevent.Greenlet | None = None

    def start(self) -> None:
        if self._watching is not None and not self._watching.dead:
            LOGGER.warning("SIGUSR2: a successor is already starting; ignored")
            return
        if self.handover.done.is_set():
            LOGGER.warning("SIGUSR2: already handed over; ignored")
            return
        self._watching = gevent.spawn(self._watch)

    def _watch(self) -> None:
        try:
            pid, status_of = self._start()
        except Exception as error:  # whatever it is, the proxy serves on
            LOGGER.error("SIGUSR2: cannot start a successor: %s; still serving", error)
            return
        LOGGER.info("SIGUSR2: started successor pid %d", pid)
        deadline = gevent.get_hub().loop.now() + SUCCESSOR_START_TIMEOUT_S
        reported = False
        while not self.handover.done.wait(STATUS_POLL_S):
            try:
                status = None if reported else status_of()
            except keeper.KeeperError as error:  # the hand-over itself goes on without it
                LOGGER.warning("SIGUSR2: successor pid %d no longer followed: %s", pid, error)
                return
            if status is not None and status != 0:
                when = "during" if self.handover.successor_pid == pid else "before taking over"
                LOGGER.error(
                    "successor pid %d exited with status %d %s; still serving", pid, status, when
                )
                return
            reported = reported or status == 0  # it detached: its child carries on
            if gevent.get_hub().loop.now() > deadline and not self.handover.busy:
                LOGGER.error(
                    "successor pid %d did not take over within %d s; still serving",
                    pid,
                    SUCCESSOR_START_TIMEOUT_S,
                )
                return


def starter(
    cwd: str, read_tls_files: Callable[..., object], *, in_loop: bool = True
) -> Callable[[], tuple[int, StatusOf]]:
    """How SIGUSR2 starts a successor: through the privileged reader when the proxy has one
    (the TLS file reader of a proxy that dropped root is the reader's), else directly.
    ``in_loop`` False: for the supervisor of workers, which runs no gevent loop (it reaps
    its children itself)."""
    owner = getattr(read_tls_files, "__self__", None)
    reader = owner if isinstance(owner, keeper.Keeper) else None

    def start() -> tuple[int, StatusOf]:
        if reader is not None:
            pid = reader.start_successor()
            return pid, lambda: reader.successor_status(pid)
        if not in_loop:
            import subprocess

            child = subprocess.Popen(list(command()), cwd=cwd, close_fds=True)
            # kept: a Popen dropped would waitpid it (``__del__``, ``subprocess._cleanup``)
            # and take its status from the supervisor, which reaps it and logs that
            _UNWAITED.append(child)
            return child.pid, lambda: None
        return spawn_directly(command(), cwd)

    return start


def spawn_directly(argv: tuple[str, ...], cwd: str) -> tuple[int, StatusOf]:
    """Start the successor as a child of this process (the proxy was never root)."""
    from gevent import subprocess

    child = subprocess.Popen(list(argv), cwd=cwd, close_fds=True)
    return child.pid, child.poll

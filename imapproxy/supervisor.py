"""``workers N``: the supervisor process and its worker processes.

The supervisor does what start-up did (listeners bound, files created, privileges dropped),
then forks the workers and stays small: it runs no gevent loop and serves no client. Each
worker is a whole proxy on the shared listening sockets with its share of the cache
(``affinity``), its block of the statistics file, and the inboxes to the other workers
(``worker_channel``).

The supervisor waits for signals on a pipe (``SignalInbox``) and, between them, sums the
workers' counters into the totals of the statistics file that up-imapproxy's ``pimpstat``
reads (``stats.Totals``); it looks for exited workers on every wake-up, not only on SIGCHLD:

* a worker that dies is logged, counted (``WorkerRestarts``) and started again with the same
  index (so it serves the same users); one that dies within a second of its start waits
  ``RESTART_DELAY_S`` first, so that a crash at start-up does not become a fork loop;
* SIGHUP goes to every worker (each reloads itself); on SIGUSR1 the supervisor logs the
  totals and each worker's figures from the statistics file;
* SIGUSR2 starts a successor (``successor``, ``takeover``), which has the hand-over with each
  worker in turn: a worker that handed over finishes its clients and exits ``HANDED_OVER``,
  and is not started again; once every worker has, the supervisor exits too (no
  ``STOPPING=1``: the service goes on in the successor, which told systemd its pid);
* SIGTERM or SIGINT: every worker stops as a single proxy does (cached sessions logged out,
  active clients given ``shutdown_timeout``); one still there ``STOP_MARGIN_S`` later is
  killed.

A worker that outlives its supervisor (killed with SIGKILL) is told by the kernel
(``PR_SET_PDEATHSIG``) and stops as on SIGTERM.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import gevent.os

from imapproxy import daemon, log
from imapproxy.successor import SUCCESSOR_START_TIMEOUT_S

LOGGER = logging.getLogger("imapproxy")

SIGNALS = (
    signal.SIGCHLD,
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
SAMPLE_INTERVAL_S = 0.25  # how often the totals of the statistics file are summed
RESTART_DELAY_S = 1.0  # before restarting a worker that died this soon after its start
STOP_MARGIN_S = 5.0  # beyond shutdown_timeout, before a worker is killed
# After one worker handed over, the others should follow at once (the successor says READY to
# all of them together); a worker still serving this much later means the successor died in
# between, and the workers that finished are started again, or their users would wait on an
# inbox that nobody reads. At least: a worker that handed over finishes its clients within
# twice shutdown_timeout (``Proxy.stop``), and one that had none exits at once.
PARTIAL_HANDOVER_S = 60.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Signals whose default action would end a worker that has no handlers for them yet: held
# (blocked) from its fork until ``cli.serve`` has installed them.
HELD_UNTIL_SERVING = {signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}

HANDED_OVER = 3  # a worker's exit status after its hand-over to a successor
WorkerMain = Callable[[int], int]  # runs worker ``index`` in the child; its exit status
SuccessorStart = Callable[[], tuple[int, Callable[[], "int | None"]]]


def worker_count(configured: int) -> int:
    """``workers``: 0 (``auto``) is the number of cores this process may run on."""
    if configured:
        return configured
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except OSError:
        return max(1, os.cpu_count() or 1)


class SignalInbox:
    """The supervisor's signals, whichever of its threads the kernel delivers them to.

    The supervisor must not use ``gevent.fork``, ``gevent.subprocess`` or ``gevent.os.waitpid``:
    they install libev's SIGCHLD handler again, whose ``waitpid(-1)`` would take the workers'
    exits from ``Supervisor._reap``.

    The supervisor has threads besides its main one (gevent's resolver pool, from start-up), and
    the kernel may deliver a signal sent to the process to any thread that does not block it.
    Blocking the signals in the main thread and taking them with ``sigtimedwait`` lost those
    delivered elsewhere: a SIGCHLD that went to the resolver thread was ignored there, and a
    worker that had exited was never reaped. Python's C-level handler runs in whichever thread
    it is delivered to and writes the signal's number to the wake-up pipe (``set_wakeup_fd``).
    """

    def __init__(self, signals: tuple[int, ...]) -> None:
        self.signals = signals
        self._read, self._write = os.pipe()
        for fd in (self._read, self._write):
            os.set_blocking(fd, False)
        self._poll = select.poll()
        self._poll.register(self._read, select.POLLIN)
        for signum in signals:
            signal.signal(signum, _noted)
            signal.siginterrupt(signum, False)  # SA_RESTART: syslog(3) and the like go on
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)  # as a successor's parent left it

    def wait(self, timeout: float) -> list[int]:
        """The signals that came (each once, in order), after at most ``timeout`` seconds."""
        # poll, not select: a successor holds every inherited session when it starts its
        # workers, and the pipe's descriptor may be above select's 1024
        if not self._poll.poll(timeout * 1000):
            return []
        try:
            data = os.read(self._read, 4096)
        except BlockingIOError:
            return []
        return [signum for signum in dict.fromkeys(data) if signum in self.signals]

    def close(self) -> None:
        """In a forked worker: the pipe and the handlers are the supervisor's."""
        signal.set_wakeup_fd(-1)
        for signum in self.signals:
            signal.signal(signum, signal.SIG_DFL)
        for fd in (self._read, self._write):
            os.close(fd)


def _noted(signum: int, frame: object) -> None:
    """The Python-level handler: the signal's number is in the wake-up pipe already."""


@dataclass
class _Worker:
    index: int
    pid: int = 0
    started: float = 0.0
    restart_at: float | None = None  # a pending restart
    finished: bool = False  # handed over to a successor: not started again


@dataclass
class Supervisor:
    """Runs ``count`` workers with ``main`` until told to stop."""

    count: int
    main: WorkerMain
    shutdown_timeout: float
    sample: Callable[[], None] = lambda: None  # sums the counters (``stats.Totals.update``)
    started: Callable[[int, int], None] = lambda index, pid: None  # worker index, its pid
    exited: Callable[[int, bool], None] = lambda index, restarting: None  # after it is reaped
    summary: Callable[[], str] = lambda: ""
    all_started: Callable[[], None] = lambda: None  # after the first start of every worker
    start_successor: SuccessorStart | None = None
    workers: list[_Worker] = field(default_factory=list)
    stopping: bool = False
    handed_over: bool = False  # every worker handed over to a successor
    successor_pid: int = 0
    first_finished_at: float | None = None
    inbox: SignalInbox | None = None
    _successor_status: Callable[[], int | None] = lambda: None  # None while it runs
    successor_started_at: float | None = None

    def run(self) -> int:
        self.inbox = SignalInbox(SIGNALS)
        self.workers = [_Worker(index) for index in range(self.count)]
        for worker in self.workers:  # a fork that fails here ends the start-up, as it should:
            self._start(worker, retry=False)  # a worker's first start may carry a hand-over
        self.all_started()
        LOGGER.info("supervisor: %d workers running", self.count)
        daemon.notify("READY=1")
        while not self.stopping:
            self._wait_and_handle(SAMPLE_INTERVAL_S)
        if not self.handed_over:
            daemon.notify("STOPPING=1")
            self._stop_all()
        return 0

    def _wait(self, timeout: float) -> list[int]:
        """The signals that came within ``timeout``; the counters summed and exited workers
        reaped (without waiting for their SIGCHLD: a lost one must not leave a worker unseen)."""
        signums = self.inbox.wait(timeout) if self.inbox is not None else []
        self.sample()
        self._reap()
        return signums

    def _wait_and_handle(self, timeout: float) -> None:
        signums = self._wait(timeout)
        if signal.SIGTERM in signums or signal.SIGINT in signums:
            self.stopping = True  # what came with it (a SIGUSR2, a SIGHUP) is moot
            return
        for signum in signums:
            self._handle(signum)
        self._due_restarts()

    def _handle(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
        elif signum == signal.SIGHUP:
            LOGGER.info("supervisor: reload: telling every worker")
            self._tell_all(signal.SIGHUP)
        elif signum == signal.SIGUSR1:
            LOGGER.info("counters of all workers: %s", self.summary())
        elif signum == signal.SIGUSR2:  # not its default: that would end the proxy
            self._start_successor()

    def _start_successor(self) -> None:
        if self.start_successor is None:
            LOGGER.warning("SIGUSR2 ignored: hand-overs are off")
            return
        if any(w.finished for w in self.workers) or self._successor_running():
            LOGGER.warning("SIGUSR2 ignored: a hand-over is under way")
            return
        try:
            self.successor_pid, self._successor_status = self.start_successor()
            self.successor_started_at = time.monotonic()
        except Exception as error:  # whatever it is, the workers serve on
            LOGGER.error("SIGUSR2: cannot start a successor: %s; still serving", error)
            return
        LOGGER.info("SIGUSR2: started successor pid %d", self.successor_pid)

    def _successor_running(self) -> bool:
        """The successor started last may still be taking over: a second one would compete
        with it for the workers' hand-overs. One that detached (exit 0, its child goes on) is
        taken to be starting until ``SUCCESSOR_START_TIMEOUT_S`` after its start."""
        if self.successor_pid:
            try:
                status = self._successor_status()
            except Exception as error:  # the privileged reader is gone: the workers serve on
                LOGGER.warning("successor pid %d cannot be followed: %s", self.successor_pid, error)
                status = 0
            if status is not None:  # ended (reaped by the privileged reader)
                if status != 0:
                    LOGGER.error(
                        "successor pid %d exited with status %d", self.successor_pid, status
                    )
                    self.successor_started_at = None  # failed: another may start
                self.successor_pid = 0
        if self.successor_pid:
            return True
        started = self.successor_started_at
        return started is not None and time.monotonic() - started < SUCCESSOR_START_TIMEOUT_S

    def _start(self, worker: _Worker, retry: bool = True) -> None:
        # blocked over the fork: the child takes its signals only once they are its own
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            pid = gevent.os.fork_gevent()
            if pid == 0:
                os._exit(_child(worker.index, self.main, self.inbox))
        except OSError as error:  # EAGAIN, ENOMEM: the others serve on meanwhile
            if not retry:
                raise
            LOGGER.error(
                "supervisor: cannot start worker %d (%s); trying again in %d s",
                worker.index,
                error.strerror or error,
                RESTART_DELAY_S,
            )
            worker.pid, worker.restart_at = 0, time.monotonic() + RESTART_DELAY_S
            return
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        worker.pid, worker.started, worker.restart_at = pid, time.monotonic(), None
        self.started(worker.index, pid)
        LOGGER.info("supervisor: worker %d started, pid %d", worker.index, pid)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = next((w for w in self.workers if w.pid == pid), None)
            if worker is not None:
                self._died(worker, status)
            elif pid == self.successor_pid:
                self.successor_pid = 0
                if status != 0:  # 0: it detached, or it is done
                    self.successor_started_at = None  # failed: another may start
                    LOGGER.error("successor pid %d %s; still serving", pid, _how_it_ended(status))

    def _died(self, worker: _Worker, status: int) -> None:
        pid, worker.pid = worker.pid, 0
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == HANDED_OVER:
            self._finished(worker, pid)
            return
        self.exited(worker.index, not self.stopping)
        if self.stopping:
            return
        LOGGER.error(
            "supervisor: worker %d (pid %d) %s; starting it again",
            worker.index,
            pid,
            _how_it_ended(status),
        )
        soon = time.monotonic() - worker.started < RESTART_DELAY_S
        worker.restart_at = time.monotonic() + (RESTART_DELAY_S if soon else 0.0)
        self._due_restarts()

    def _finished(self, worker: _Worker, pid: int) -> None:
        worker.finished = True
        self.exited(worker.index, False)
        LOGGER.info("supervisor: worker %d (pid %d) handed over and finished", worker.index, pid)
        if self.first_finished_at is None:
            self.first_finished_at = time.monotonic()
        if all(w.finished for w in self.workers):
            self.handed_over = self.stopping = True

    @property
    def partial_handover_s(self) -> float:
        return max(PARTIAL_HANDOVER_S, 2 * self.shutdown_timeout + 2 * STOP_MARGIN_S)

    def _partial_handover(self, now: float) -> None:
        """Some workers handed over, the others never did: start the finished ones again."""
        limit = self.partial_handover_s
        if self.first_finished_at is None or now - self.first_finished_at < limit:
            return
        self.first_finished_at = None
        for worker in self.workers:
            if worker.finished:
                LOGGER.error(
                    "supervisor: the hand-over did not reach every worker within %d s; "
                    "starting worker %d again",
                    limit,
                    worker.index,
                )
                worker.finished, worker.restart_at = False, now

    def _due_restarts(self) -> None:
        now = time.monotonic()
        self._partial_handover(now)
        for worker in self.workers:
            if worker.restart_at is not None and worker.restart_at <= now and not self.stopping:
                self._start(worker)

    def _tell_all(self, signum: int) -> None:
        for worker in self.workers:
            if worker.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signum)

    def _stop_all(self) -> None:
        LOGGER.info("supervisor: stopping the workers")
        self._tell_all(signal.SIGTERM)
        deadline = time.monotonic() + self.shutdown_timeout + STOP_MARGIN_S
        while any(w.pid for w in self.workers) and time.monotonic() < deadline:
            self._wait(SAMPLE_INTERVAL_S)
        for worker in self.workers:
            if worker.pid:
                LOGGER.error("supervisor: worker %d did not stop: killed", worker.index)
                os.kill(worker.pid, signal.SIGKILL)
                os.waitpid(worker.pid, 0)
                worker.pid = 0
                self.exited(worker.index, False)
        self.sample()


def _child(index: int, main: WorkerMain, inbox: SignalInbox | None = None) -> int:
    """In the forked worker: the signals back to normal, then the proxy."""
    try:
        os.environ.pop("NOTIFY_SOCKET", None)  # systemd hears the supervisor only
        log.forked()
        if inbox is not None:  # its handlers back to the defaults too
            inbox.close()
        # until ``cli.serve`` has its handlers, a SIGHUP the supervisor passes on would kill it
        signal.pthread_sigmask(signal.SIG_SETMASK, HELD_UNTIL_SERVING)
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        return main(index)
    except BaseException:
        LOGGER.exception("worker %d failed", index)
        return 70  # EX_SOFTWARE


def _how_it_ended(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by signal {os.WTERMSIG(status)}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"

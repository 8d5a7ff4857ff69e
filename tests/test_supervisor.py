"""The supervisor's decisions on a worker's end, without forking (``supervisor``)."""

from __future__ import annotations

import errno
import resource
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable

import pytest

from imapproxy import keeper, supervisor
from imapproxy.supervisor import HANDED_OVER, Supervisor, _Worker


def exit_status(code: int) -> int:
    return code << 8  # as os.waitpid reports an exit


def made(count: int) -> tuple[Supervisor, list[tuple[int, bool]], list[int]]:
    exits: list[tuple[int, bool]] = []
    starts: list[int] = []
    boss = Supervisor(count, lambda index: 0, 1.0, exited=lambda i, r: exits.append((i, r)))
    boss.workers = [_Worker(i, pid=100 + i, started=0.0) for i in range(count)]
    boss._start = lambda worker: starts.append(worker.index)  # type: ignore[method-assign]
    return boss, exits, starts


def test_a_dead_worker_is_counted_and_started_again() -> None:
    boss, exits, starts = made(2)
    boss._died(boss.workers[1], signal.SIGKILL)  # killed by a signal
    assert exits == [(1, True)] and starts == [1]
    assert not boss.stopping


def test_a_worker_that_dies_at_once_waits_before_its_restart() -> None:
    boss, exits, starts = made(2)
    boss.workers[0].started = supervisor.time.monotonic()
    boss._died(boss.workers[0], exit_status(70))
    assert starts == [] and boss.workers[0].restart_at is not None


def test_workers_that_handed_over_are_not_started_again_and_then_the_supervisor_ends() -> None:
    boss, exits, starts = made(2)
    boss._died(boss.workers[0], exit_status(HANDED_OVER))
    assert starts == [] and not boss.handed_over and not boss.stopping
    boss._died(boss.workers[1], exit_status(HANDED_OVER))
    assert starts == [] and boss.handed_over and boss.stopping
    assert exits == [(0, False), (1, False)]


def test_while_stopping_nothing_is_started_again() -> None:
    boss, exits, starts = made(2)
    boss.stopping = True
    boss._died(boss.workers[0], exit_status(0))
    assert starts == [] and exits == [(0, False)] and not boss.handed_over


def test_sigusr2_without_a_way_to_start_a_successor_is_only_logged() -> None:
    boss, _, _ = made(1)
    boss._start_successor()  # no start_successor: hand-overs off
    assert boss.successor_pid == 0
    boss.start_successor = lambda: (4242, lambda: None)
    boss._start_successor()
    assert boss.successor_pid == 4242


def test_auto_is_the_cores_this_process_may_use() -> None:
    assert supervisor.worker_count(0) >= 1
    assert supervisor.worker_count(5) == 5


def test_workers_that_handed_over_alone_are_started_again_after_a_while() -> None:
    """The successor died between two workers' READY: the one that finished comes back."""
    boss, _, starts = made(2)
    boss._died(boss.workers[0], exit_status(HANDED_OVER))
    boss._due_restarts()
    assert starts == []
    assert boss.first_finished_at is not None
    boss.first_finished_at -= boss.partial_handover_s + 1
    boss._due_restarts()
    assert starts == [0] and not boss.workers[0].finished and not boss.handed_over


def run_python(script: str) -> str:
    """``script`` in a new interpreter (signal handlers, forks and reaping stay out of pytest's)."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_signal_delivered_to_another_thread_reaches_the_supervisor() -> None:
    """The supervisor has other threads (gevent's resolver pool): a signal the kernel gives one
    of them is still in the inbox. The main thread blocks it here, so only the other can take it;
    ``sigtimedwait`` in the main thread never saw such a signal."""
    out = run_python(
        """
        import os, signal, threading, time
        from imapproxy.supervisor import SignalInbox
        inbox = SignalInbox((signal.SIGUSR1, signal.SIGCHLD))
        threading.Thread(target=time.sleep, args=(10,), daemon=True).start()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        os.kill(os.getpid(), signal.SIGUSR1)
        print(inbox.wait(10), inbox.wait(0.01))
        """
    )
    assert out == f"[{int(signal.SIGUSR1)}] []"


def test_a_worker_is_reaped_even_when_no_sigchld_comes() -> None:
    """A worker that handed over and exited is seen on the supervisor's next wake-up."""
    out = run_python(
        """
        import os, time
        from imapproxy.supervisor import HANDED_OVER, Supervisor, _Worker
        class Silent:
            def wait(self, timeout):
                time.sleep(timeout)
                return []
        pid = os.fork()
        if pid == 0:
            os._exit(HANDED_OVER)
        boss = Supervisor(1, lambda index: 0, 1.0)
        boss.workers, boss.inbox = [_Worker(0, pid=pid)], Silent()
        deadline = time.monotonic() + 20
        while not boss.handed_over and time.monotonic() < deadline:
            boss._wait_and_handle(0.01)
        print(boss.handed_over, boss.workers[0].finished, boss.workers[0].pid)
        """
    )
    assert out == "True True 0"


def test_a_worker_that_cannot_be_forked_is_tried_again_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """fork fails (EAGAIN: the process limit): logged, the supervisor goes on, and the worker
    is started again a second later; the signals are not left blocked."""

    def no_fork() -> int:
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(supervisor.gevent.os, "fork_gevent", no_fork)
    boss = Supervisor(1, lambda index: 0, 1.0)
    worker = _Worker(0)
    boss._start(worker)
    assert worker.pid == 0 and worker.restart_at is not None
    assert worker.restart_at > supervisor.time.monotonic() + supervisor.RESTART_DELAY_S / 2
    assert not set(supervisor.SIGNALS) & signal.pthread_sigmask(signal.SIG_BLOCK, [])


@pytest.mark.parametrize(
    "signums", [[signal.SIGTERM, signal.SIGUSR2], [signal.SIGUSR2, signal.SIGHUP, signal.SIGTERM]]
)
def test_nothing_that_came_with_sigterm_is_acted_on(signums: list[int]) -> None:
    """SIGTERM and SIGUSR2 read in one wake-up, in either order: the supervisor stops and
    starts no successor."""
    boss, _, _ = made(2)
    started: list[int] = []
    boss.start_successor = lambda: (started.append(1), (4242, lambda: None))[1]

    class Both:
        def wait(self, timeout: float) -> list[int]:
            return signums

    boss.inbox = Both()  # type: ignore[assignment]
    boss._reap = lambda: None  # type: ignore[method-assign]
    boss._wait_and_handle(0.0)
    assert boss.stopping and started == [] and boss.successor_pid == 0


@pytest.mark.skipif(
    resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 1200, reason="descriptor limit below 1200"
)
def test_the_inbox_works_above_select_s_descriptor_limit() -> None:
    """A successor starts its workers holding every inherited session: the inbox's pipe may be
    numbered above 1024, where ``select`` refuses to work."""
    out = run_python(
        """
        import os, resource, signal
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
        held = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
        from imapproxy.supervisor import SignalInbox
        inbox = SignalInbox((signal.SIGUSR1,))
        os.kill(os.getpid(), signal.SIGUSR1)
        print(inbox._read > 1024, inbox.wait(5), inbox.wait(0.01))
        """
    )
    assert out == f"True [{int(signal.SIGUSR1)}] []"


def test_a_second_sigusr2_while_the_successor_runs_starts_no_other() -> None:
    """Two successors would compete for the workers' hand-overs: while the first one runs, a
    second SIGUSR2 is only logged; once it has ended, a new one may start."""
    boss, _, _ = made(2)
    started: list[int] = []
    status: list[int | None] = [None]

    def start() -> tuple[int, Callable[[], int | None]]:
        started.append(1)
        return 4242 + len(started), lambda: status[0]

    boss.start_successor = start
    boss._start_successor()
    boss._start_successor()  # the first still runs
    assert started == [1] and boss.successor_pid == 4243
    status[0] = 78  # it failed (a bad configuration, say)
    boss._start_successor()
    assert started == [1, 1] and boss.successor_pid == 4244


def test_the_wait_for_a_partial_hand_over_outlasts_the_workers_finishing() -> None:
    """A worker that handed over gives its clients up to twice shutdown_timeout: the others
    are not taken for lost before that."""
    boss = Supervisor(2, lambda index: 0, shutdown_timeout=100.0)
    assert boss.partial_handover_s >= 200
    assert Supervisor(2, lambda index: 0, 1.0).partial_handover_s == supervisor.PARTIAL_HANDOVER_S


def test_a_successor_that_detached_counts_as_starting_for_a_while() -> None:
    """Exit 0: it detached and its child is taking over; a second SIGUSR2 meanwhile is ignored."""
    boss, _, _ = made(2)
    started: list[int] = []
    boss.start_successor = lambda: (started.append(1), (4242, lambda: 0))[1]
    boss._start_successor()
    boss._start_successor()
    assert started == [1]
    assert boss.successor_started_at is not None
    boss.successor_started_at -= supervisor.SUCCESSOR_START_TIMEOUT_S + 1
    boss._start_successor()
    assert started == [1, 1]


def test_a_privileged_reader_that_cannot_be_asked_does_not_end_the_supervisor() -> None:
    boss, _, _ = made(2)

    def unanswered() -> int | None:
        raise keeper.KeeperError("the privileged reader (pid 7) did not answer: timed out")

    boss.start_successor = lambda: (4242, unanswered)
    boss._start_successor()
    boss.successor_started_at = None  # long ago
    boss.start_successor = lambda: (4343, lambda: None)
    boss._start_successor()  # logged; the second one starts
    assert boss.successor_pid == 4343

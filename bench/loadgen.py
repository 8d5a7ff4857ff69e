"""The load generator: worker processes, separate from every server, running script threads.

``LoadGenerator(workers)`` starts that many processes (``spawn``, so they hold nothing of the
parent) that live for the whole benchmark and keep connections between jobs (the ``limit``
sessions, the ``hold`` connections). ``run(job)`` deals the job's threads out round-robin
(thread ``i`` to worker ``i % workers``, the same worker for the same thread every time), each
worker runs its threads, and the tallies come back merged.

In a worker, every thread prepares (untimed), then all meet at a barrier, then each runs its
script's timed ``step`` until the window of ``duration_s`` closes; a step already started
finishes (each I/O is bounded by ``timeout_s``). A worker's rate is its units over its window
(until its last thread finished); the job's rate is the sum over workers, which ran at once.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import resource
import threading
import time
import traceback
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection as Pipe
from multiprocessing.process import BaseProcess

from bench.pages import SCRIPTS, Job, Tally, WorkerState
from bench.wire import WireError

ERROR_PAUSE_S = 0.01  # after a failed step, so that a dead target is not hammered
BARRIER_TIMEOUT_S = 120.0
JOB_MARGIN_S = 60.0  # a job's reply is awaited for its window, its set-up, and this


@dataclass
class Outcome:
    """A job's merged tally and the rate of units per second."""

    tally: Tally
    rate: float


class LoadGenerator:
    """Long-lived worker processes driven over pipes."""

    def __init__(self, workers: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipes: list[Pipe] = []
        self.processes: list[BaseProcess] = []
        for _ in range(workers):
            parent_end, child_end = context.Pipe()
            process = context.Process(target=worker_main, args=(child_end,), daemon=True)
            process.start()
            child_end.close()
            self.pipes.append(parent_end)
            self.processes.append(process)

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None]

    def run(self, job: Job, max_wait_s: float) -> Outcome:
        """Run ``job`` on the workers its threads need; wait at most ``max_wait_s``."""
        count = len(self.pipes)
        numbers = tuple(range(len(job.threads)))
        busy = [
            (pipe, replace(job, threads=job.threads[i::count], thread_numbers=numbers[i::count]))
            for i, pipe in enumerate(self.pipes)
            if job.threads[i::count]
        ]
        for pipe, share in busy:
            pipe.send(share)
        merged, rate = Tally(), 0.0
        deadline = time.monotonic() + max_wait_s
        for pipe, _ in busy:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"load generator: {job.script} job still running")
            answer = pipe.recv()
            if isinstance(answer, str):
                raise RuntimeError(f"load generator worker failed:\n{answer}")
            merged.add(answer)
            merged.elapsed_s = max(merged.elapsed_s, answer.elapsed_s)
            rate += answer.units / answer.elapsed_s if answer.elapsed_s > 0 else 0.0
        return Outcome(merged, rate)

    def broadcast(self, script: str) -> None:
        """A control job (``release``, ``reset``) on every worker."""
        for pipe in self.pipes:
            pipe.send(script)
        for pipe in self.pipes:
            if pipe.poll(JOB_MARGIN_S):
                pipe.recv()

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()


def worker_main(pipe: Pipe) -> None:
    """A worker's loop: a job in, its tally out; ``None`` ends it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # ``hold`` keeps thousands open
    state = WorkerState()
    while True:
        try:
            job = pipe.recv()
        except (EOFError, KeyboardInterrupt):
            break
        if job is None:
            break
        try:
            pipe.send(control(job, state) if isinstance(job, str) else run_threads(job, state))
        except KeyboardInterrupt:
            break
        except Exception:
            pipe.send(traceback.format_exc())
    state.close_all()


def control(command: str, state: WorkerState) -> str:
    """``release``: close the held connections; ``reset``: close everything kept."""
    if command == "release":
        for connection in state.held:
            connection.close()
        state.held.clear()
    elif command == "reset":
        state.close_all()
    return command


def run_threads(job: Job, state: WorkerState) -> Tally:
    tallies = [Tally() for _ in job.threads]
    barrier = threading.Barrier(len(job.threads), timeout=BARRIER_TIMEOUT_S)
    threads = [
        threading.Thread(target=run_script, args=(job, number, state, tally, barrier))
        for number, tally in enumerate(tallies)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    merged = Tally()
    for tally in tallies:
        merged.add(tally)
        merged.elapsed_s = max(merged.elapsed_s, tally.elapsed_s)
    return merged


def run_script(
    job: Job, index: int, state: WorkerState, tally: Tally, barrier: threading.Barrier
) -> None:
    """Thread ``index`` of the job: prepare, meet the others, run steps until the window closes."""
    script = SCRIPTS[job.script](job, index, state, tally)
    try:
        script.prepare()
        ready = True
    except WireError as error:
        tally.errors[f"{error.kind} (set-up)"] += 1
        ready = False
    barrier.wait()
    start = time.perf_counter()
    deadline = start + job.duration_s
    going = ready
    while going and not script.exhausted() and time.perf_counter() < deadline:
        began = time.perf_counter()
        try:
            script.step()
        except WireError as error:
            tally.errors[error.kind] += 1
            going = not script.stop_on_error
            time.sleep(ERROR_PAUSE_S)
            continue
        took = time.perf_counter() - began
        tally.units += 1
        tally.busy_s += took
        tally.latencies_s.append(took)
    tally.elapsed_s = time.perf_counter() - start
    script.finish()

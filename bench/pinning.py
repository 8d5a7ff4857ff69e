"""CPU affinity for a case: the proxies on one CPU, Dovecot and the load generator on another.

On a 2-core machine the load generator, Dovecot and the proxy share both cores, so a proxy's
figures move with what the others take. Pinned (``sched_setaffinity``, what ``taskset -a -p``
does), the proxy has a CPU of its own among the bench's processes and the rest shares the
other. Affinity is per thread: every task (``/proc/<pid>/task``) of every process of each tree
(``procstat.descendants``) is set; a thread or process started later inherits its creator's.
On leaving, every task of the same trees (new ones too) gets the CPUs the bench itself may use
back. Other programs on the machine are not kept off either CPU: that would take moving them
into another cpuset, which is not ours to do.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator

from bench import procstat


class PinningError(Exception):
    """The processes could not be pinned apart (said in the report instead of figures)."""


def two_cpus() -> tuple[int, int] | None:
    """(the CPU for the rest, the CPU for the proxies), or None with fewer than two allowed."""
    allowed = sorted(os.sched_getaffinity(0))
    return (allowed[0], allowed[1]) if len(allowed) >= 2 else None


def tasks(pid: int) -> list[int]:
    """The thread ids of ``pid`` (empty when it is gone)."""
    try:
        return [int(tid) for tid in os.listdir(f"{procstat.PROC}/{pid}/task")]
    except OSError:
        return []


def pin_trees(roots: Iterable[int], cpus: set[int]) -> int:
    """Set the affinity of every task of each root and its descendants; the tasks set."""
    count = 0
    for root in roots:
        for pid in [root, *procstat.descendants(root)]:
            for tid in tasks(pid):
                with contextlib.suppress(OSError):  # a thread that has just ended
                    os.sched_setaffinity(tid, cpus)
                    count += 1
    return count


@contextlib.contextmanager
def pinned(proxies: list[int], others: list[int]) -> Iterator[tuple[int, int]]:
    """``proxies`` (process trees) on one CPU and ``others`` on another while inside.

    Yields (the others' CPU, the proxies' CPU); raises ``PinningError`` with fewer than two
    CPUs or when no task could be pinned (no permission).
    """
    cpus = two_cpus()
    if cpus is None:
        raise PinningError("fewer than two CPUs allowed: nothing to pin apart")
    everything = set(os.sched_getaffinity(0))
    rest, proxy = cpus
    try:
        if not pin_trees(proxies, {proxy}) or not pin_trees(others, {rest}):
            raise PinningError("no task could be pinned (sched_setaffinity refused)")
        yield rest, proxy
    finally:
        pin_trees(proxies + others, everything)

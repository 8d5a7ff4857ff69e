"""CPU seconds and resident memory of processes, read from ``/proc`` (Linux only).

The rules of the method, as the report states them:

- A proxy's CPU is ``utime + stime`` of ``/proc/<pid>/stat`` (fields 14 and 15, in clock
  ticks of 10 ms): it includes all threads, also those that have exited (up-imapproxy runs one
  per client). A round costs a proxy hundreds of ticks, so the resolution is enough. A proxy
  may be a tree of processes (imapproxy's ``workers N``: a supervisor and N workers, each a
  whole proxy; and its privileged file readers): ``tree_times`` adds the ``utime`` and the
  ``stime`` of the root and of every live descendant (``/proc/<pid>/task/<tid>/children``,
  followed down), and the root's ``cutime + cstime`` (children it has reaped: a worker that
  died and was replaced). Each process is truncated to ticks on its own, an error of under
  a tick per process and reading against hundreds per worker and round.
- Dovecot's CPU is spread over hundreds of single-threaded processes (one ``imap`` process per
  session) that each use a few ms in a round: there, truncation to ticks would add an error
  of up to two ticks per process and reading. So the master and each of its live children
  (``/proc/<pid>/task/<pid>/children``) count with the first field of
  ``/proc/<pid>/schedstat`` (run time in ns), and to that we add the master's
  ``cutime + cstime``: the CPU of children it has already reaped (an ``imap`` process that
  served its 256 sessions, a login process that exited), rounded once. Time of a child that is
  still alive is in its own ``schedstat``, so nothing is counted twice; a child that exits
  between two readings moves from the one to the other. Grandchildren are not looked for:
  Dovecot's master forks every service process itself.
- Resident memory is ``VmRSS`` of ``/proc/<pid>/status``, in KiB.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
PROC = "/proc"
MAX_DESCENDANTS = 1024  # a bound on the walk of a process tree (a proxy has a few)


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` we use."""

    pid: int
    comm: str
    ppid: int
    user_ticks: int  # utime, all threads
    system_ticks: int  # stime, all threads
    reaped_user_ticks: int  # cutime: children reaped so far
    reaped_system_ticks: int  # cstime

    @property
    def cpu_ticks(self) -> int:
        return self.user_ticks + self.system_ticks

    @property
    def reaped_children_ticks(self) -> int:
        return self.reaped_user_ticks + self.reaped_system_ticks


@dataclass(frozen=True)
class CpuTimes:
    """User and system CPU seconds."""

    user_s: float
    system_s: float

    @property
    def total_s(self) -> float:
        return self.user_s + self.system_s


def read_stat(pid: int) -> ProcStat | None:
    """The stat of ``pid``, or None when it is gone."""
    try:
        with open(f"{PROC}/{pid}/stat", "rb") as file:
            raw = file.read()
    except OSError:
        return None
    close = raw.rindex(b")")  # comm may contain spaces and parentheses
    comm = raw[raw.index(b"(") + 1 : close].decode(errors="replace")
    fields = raw[close + 2 :].split()  # fields[0] is field 3 (state)
    return ProcStat(
        pid=pid,
        comm=comm,
        ppid=int(fields[1]),
        user_ticks=int(fields[11]),
        system_ticks=int(fields[12]),
        reaped_user_ticks=int(fields[13]),
        reaped_system_ticks=int(fields[14]),
    )


def children(pid: int) -> list[int]:
    """The live children of a process (``/proc/<pid>/task/<tid>/children``, all threads)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"{PROC}/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"{PROC}/{pid}/task/{task}/children", "rb") as file:
                found.extend(int(child) for child in file.read().split())
        except OSError:
            continue
    return found


def run_time_ns(pid: int) -> int:
    """The run time of a single-threaded process in ns (0 when it is gone)."""
    try:
        with open(f"{PROC}/{pid}/schedstat", "rb") as file:
            return int(file.read().split()[0])
    except (OSError, IndexError, ValueError):
        return 0


def process_cpu_s(pid: int) -> float:
    """CPU seconds of one process and its threads so far (0.0 when it is gone)."""
    stat = read_stat(pid)
    return stat.cpu_ticks / CLOCK_TICKS_PER_S if stat else 0.0


def tree_cpu_s(root_pid: int) -> float:
    """CPU seconds of a process, its live children and the children it has reaped."""
    root = read_stat(root_pid)
    if root is None:
        return 0.0
    live_ns = run_time_ns(root_pid) + sum(run_time_ns(child) for child in children(root_pid))
    return live_ns / 1e9 + root.reaped_children_ticks / CLOCK_TICKS_PER_S


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children, their children, ...), parents first."""
    found: list[int] = []
    pending = children(pid)
    while pending and len(found) < MAX_DESCENDANTS:
        child = pending.pop(0)
        found.append(child)
        pending.extend(children(child))
    return found


def tree_times(root_pid: int) -> CpuTimes | None:
    """User and system CPU of a process tree (see the module's rules); None when it is gone."""
    root = read_stat(root_pid)
    if root is None:
        return None
    user = root.user_ticks + root.reaped_user_ticks
    system = root.system_ticks + root.reaped_system_ticks
    for pid in descendants(root_pid):
        stat = read_stat(pid)
        if stat is not None:
            user, system = user + stat.user_ticks, system + stat.system_ticks
    return CpuTimes(user / CLOCK_TICKS_PER_S, system / CLOCK_TICKS_PER_S)


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (0 when it is gone)."""
    try:
        with open(f"{PROC}/{pid}/status", encoding="ascii", errors="replace") as file:
            for line in file:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def established_to(port: int) -> int:
    """Established TCP connections whose local port is ``port`` (server side, IPv4 and IPv6).

    The number of sessions a server holds, read from ``/proc/net/tcp``: for Dovecot this counts
    every client connection, whichever imap process serves it.
    """
    local = f":{port:04X}"
    count = 0
    for table in ("tcp", "tcp6"):
        try:
            with open(f"{PROC}/net/{table}", encoding="ascii") as file:
                next(file, None)
                for line in file:
                    fields = line.split(None, 4)
                    if fields[3] == "01" and fields[1].endswith(local):
                        count += 1
        except OSError:
            continue
    return count


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all CPUs; ``/proc/stat``, not idle/iowait)."""
    with open(f"{PROC}/stat", encoding="ascii") as file:
        fields = [int(v) for v in file.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS_PER_S

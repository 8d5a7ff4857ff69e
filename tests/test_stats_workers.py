"""The statistics file with a worker table (``workers N``): the layout byte by byte, each
worker's block, the supervisor's ``Totals`` (sums, peaks of the sum, resets, a worker that
exits), and the readers (``read_file``, ``summed``) on files old and new. No sockets."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imapproxy import stats
from imapproxy.stats import Counters, Totals
from tests.support.statsfile import close_file

START = 1_700_000_000
LATER = START + 60


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "pimpstats")


@pytest.fixture
def three(path: str) -> Iterator[tuple[Counters, Totals]]:
    """A file of 3 workers, the supervisor started at START and each worker at START + 1."""
    counters = stats.create_file(path, workers=3)
    totals = Totals(counters)
    totals.start(START)
    for worker in totals.workers:
        worker.start(START + 1)
    yield counters, totals
    close_file(counters, totals)


def u32(buffer: bytes, offset: int) -> int:
    return int(struct.unpack_from("<I", buffer, offset)[0])


def u64(buffer: bytes, offset: int) -> int:
    return int(struct.unpack_from("<Q", buffer, offset)[0])


def file_bytes(path: str) -> bytes:
    return Path(path).read_bytes()


# -- the layout -----------------------------------------------------------------------------------


def test_one_worker_is_todays_file_byte_for_byte(path: str, tmp_path: Path) -> None:
    """create_file(path) and create_file(path, 1): 392 bytes, the same bytes for the same
    changes as a Counters over a bytearray (today's file), and no worker table."""
    other = str(tmp_path / "other")
    for counters in (stats.create_file(path), stats.create_file(other, workers=1)):
        counters.start(START)
        counters.client_connected()
        counters.set_server_connections(2, 3)
        counters.TotalClientLogins += 7
        counters.set_backend_tls(1, START, "working")
        assert counters.worker_count() == 0 and counters.WorkerRestarts == 0
        close_file(counters)
    expected = Counters(bytearray(stats.FILE_SIZE))
    expected.start(START)
    expected.client_connected()
    expected.set_server_connections(2, 3)
    expected.TotalClientLogins += 7
    expected.set_backend_tls(1, START, "working")
    assert file_bytes(path) == file_bytes(other) == bytes(expected.buffer)
    assert len(file_bytes(path)) == 392
    assert file_bytes(path)[:16] == struct.pack("<qq", START, START)
    assert file_bytes(path)[16:20] == struct.pack("<I", 1)
    assert file_bytes(path)[72:80] == b"IPXS" + struct.pack("<I", 2)


def test_the_worker_table_at_its_documented_offsets(path: str) -> None:
    counters = stats.create_file(path, workers=3)
    close_file(counters)
    data = file_bytes(path)
    assert len(data) == stats.file_size(3) == 808 + 3 * 408
    assert data[392:416] == b"IPXW" + struct.pack("<IQQ", 3, 0, 0)
    for block in (0, 416, 824, 824 + 408, 824 + 2 * 408):  # totals, retired, workers 0-2
        assert data[block + 72 : block + 80] == b"IPXS" + struct.pack("<I", 2), block
    assert [stats.worker_block_offset(i) for i in range(3)] == [824, 1232, 1640]
    assert stats.RETIRED_OFFSET == 416 and stats.FIRST_SLOT_OFFSET == 808


def test_a_workers_writes_land_in_its_block_and_nowhere_else(path: str) -> None:
    counters = stats.create_file(path, workers=3)
    before = file_bytes(path)
    worker = counters.worker(1)
    worker.TotalClientLogins = 0x01020304
    worker.BackendWaits = 2**40 + 5
    worker.set_backend_tls(2, LATER, "failing: refused (look at server_port)")
    counters.set_worker_pid(1, 4242)
    counters.count_worker_restart(2)
    worker.release()
    close_file(counters)
    after = file_bytes(path)
    block, slot1, slot2 = 1232, 808 + 408, 808 + 2 * 408
    assert u32(after, block + 44) == 0x01020304
    assert u64(after, block + 80 + 5 * 8) == 2**40 + 5
    assert u64(after, block + 128) == 2 and u64(after, block + 136) == LATER
    assert after[block + 144 : block + 144 + 39] == b"failing: refused (look at server_port)\0"
    assert u64(after, slot1) == 4242
    assert u64(after, slot2 + 8) == 1 and u64(after, 400) == 1  # the slot's and the total
    changed = [i for i in range(len(after)) if after[i] != before[i]]
    allowed = [*range(block, block + stats.FILE_SIZE), *range(slot1, slot1 + 8)]
    allowed += [*range(slot2 + 8, slot2 + 16), *range(400, 408)]
    assert set(changed) <= set(allowed) and u32(after, 44) == 0  # the totals untouched


def test_every_counters_method_works_on_a_workers_block(path: str) -> None:
    counters = stats.create_file(path, workers=2)
    worker = counters.worker(0)
    worker.set_backend_tls(1, START, "working")
    worker.start(START)  # zeroes the counters, keeps the TLS status
    worker.mark_extension()
    worker.client_connected()
    worker.client_connected()
    worker.client_disconnected()
    worker.set_server_connections(3, 5)
    worker.set_server_connections(1, 2)
    worker.TotalClientLogins += 4
    worker.SelectCacheHits += 1
    worker.reset(LATER)
    snapshot = worker.snapshot()
    assert worker.has_extension() and worker.backend_tls() == (1, START, "working")
    assert (snapshot["StartTime"], snapshot["CountTime"]) == (START, LATER)
    assert snapshot["CurrentClientConnections"] == snapshot["PeakClientConnections"] == 1
    assert (snapshot["InUseServerConnections"], snapshot["PeakInUseServerConnections"]) == (1, 1)
    assert snapshot["TotalClientLogins"] == 0 and snapshot["SelectCacheHits"] == 1
    assert stats.summary(worker).startswith("clients 1 (peak 1), active 1 (peak 1)")
    assert worker.worker_count() == 0  # a block has no table of its own
    worker.release()
    other = counters.worker(1)
    assert other.snapshot()["CurrentClientConnections"] == 0
    other.release()
    close_file(counters)


def test_out_of_range_and_missing_tables_are_errors(path: str) -> None:
    single = Counters.in_memory()
    with pytest.raises(IndexError):
        single.worker(0)
    with pytest.raises(ValueError, match="no worker table"):
        single.WorkerRestarts = 1
    with pytest.raises(ValueError, match="no worker table"):
        Totals(single)
    for workers in (0, stats.MAX_WORKERS + 1):
        with pytest.raises(ValueError, match="workers must be 1 to 1024"):
            stats.create_file(path, workers=workers)
    counters = stats.create_file(path, workers=2)
    for index in (-1, 2):
        with pytest.raises(IndexError, match="no worker"):
            counters.worker(index)
    close_file(counters)


def test_an_in_memory_table_is_shared_with_a_forked_process() -> None:
    """No stat_filename: an anonymous shared map, which the forked workers write into."""
    counters = Counters.in_memory(2)
    assert counters.worker_count() == 2
    pid = os.fork()
    if pid == 0:  # the child: write and leave at once
        child = counters.worker(1)
        child.TotalClientLogins = 9
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    worker = counters.worker(1)
    assert worker.TotalClientLogins == 9
    worker.release()
    close_file(counters)


# -- Totals: the supervisor's sums --------------------------------------------------------------


def test_totals_sum_counters_and_gauges(three: tuple[Counters, Totals]) -> None:
    counters, totals = three
    for index, worker in enumerate(totals.workers, start=1):
        worker.client_connected()
        worker.set_server_connections(index, 10 * index)
        worker.TotalClientLogins = 100 * index
        worker.TotalServerConnectionsReused = index
        worker.TotalCapacityRefusals = 1000 * index
    totals.update()
    assert counters.CurrentClientConnections == counters.PeakClientConnections == 3
    assert counters.InUseServerConnections == 6 and counters.RetainedServerConnections == 60
    assert counters.TotalClientLogins == 600 and counters.TotalServerConnectionsReused == 6
    assert counters.TotalClientConnectionsAccepted == 3
    assert counters.TotalCapacityRefusals == 6000
    assert (counters.StartTime, counters.CountTime) == (START, START)  # a start is no reset


def test_the_total_peak_is_the_peak_of_the_sum_not_the_sum_of_peaks(
    three: tuple[Counters, Totals],
) -> None:
    counters, totals = three
    first, second, _ = totals.workers
    first.set_server_connections(4, 0)
    totals.update()
    first.set_server_connections(0, 0)
    second.set_server_connections(3, 0)  # each worker peaked: 4 and 3
    totals.update()
    assert counters.InUseServerConnections == 3
    assert counters.PeakInUseServerConnections == 4  # not 7: never 7 at once
    second.set_server_connections(5, 0)
    totals.update()
    assert counters.PeakInUseServerConnections == 5


def test_a_reset_of_every_block_restarts_the_total_peaks_from_the_sums(
    three: tuple[Counters, Totals],
) -> None:
    """XPROXY_RESETCOUNTERS on the whole file (any worker may run it): every block reset."""
    counters, totals = three
    for worker in totals.workers:
        worker.client_connected()
        worker.client_connected()
        worker.TotalClientLogins = 5
        worker.SelectCacheHits = 2
    totals.update()
    for worker in totals.workers:
        worker.client_disconnected()
    counters.reset(LATER)
    totals.update()
    assert counters.PeakClientConnections == counters.CurrentClientConnections == 3
    assert counters.TotalClientLogins == 0 and counters.SelectCacheHits == 6  # as up-imapproxy
    assert counters.CountTime == LATER and counters.StartTime == START
    assert all(worker.CountTime == LATER for worker in [totals.retired, *totals.workers])


def test_a_reset_of_one_block_is_carried_to_every_block(three: tuple[Counters, Totals]) -> None:
    """XPROXY_RESETCOUNTERS in a worker that reset only its own block: the supervisor's next
    update resets the others and the retired block, and restarts the peaks."""
    counters, totals = three
    first, second, third = totals.workers
    first.client_connected()
    second.client_connected()
    second.TotalClientLogins = 3
    third.TotalServerConnectionsCreated = 4
    totals.update()
    second.client_disconnected()
    totals.retired.TotalClientLogins = 50  # from a worker that exited
    first.reset(LATER)
    totals.update()
    assert counters.PeakClientConnections == 1  # restarted from the current sum
    assert counters.CountTime == LATER
    assert counters.TotalClientLogins == counters.TotalServerConnectionsCreated == 0
    assert all(block.CountTime == LATER for block in [totals.retired, *totals.workers])
    second.client_connected()
    second.client_connected()
    totals.update()  # no second reset: the peaks go on
    second.client_disconnected()
    totals.update()
    assert counters.PeakClientConnections == 3 and counters.CurrentClientConnections == 2


def test_a_worker_that_exits_keeps_the_totals_and_a_restart_is_no_reset(
    three: tuple[Counters, Totals],
) -> None:
    counters, totals = three
    first, second, _ = totals.workers
    counters.set_worker_pid(1, 1234)
    for worker in (first, second):
        worker.client_connected()
        worker.set_server_connections(1, 2)
        worker.TotalClientLogins = 10
        worker.TotalServerConnectionsExpired = 4
    totals.update()
    totals.worker_exited(1)
    assert counters.worker_pid(1) == 0 and second.snapshot()["TotalClientLogins"] == 0
    assert totals.retired.TotalClientLogins == 10 and totals.retired.CurrentClientConnections == 0
    assert counters.TotalClientLogins == 20 and counters.TotalServerConnectionsExpired == 8
    assert counters.CurrentClientConnections == 1 and counters.RetainedServerConnections == 2
    assert counters.PeakClientConnections == 2  # the peak stays: it was reached
    counters.count_worker_restart(1)
    counters.set_worker_pid(1, 1240)
    second.start(LATER)  # the successor starts in the slot
    second.TotalClientLogins += 1
    totals.update()
    assert counters.TotalClientLogins == 21 and counters.PeakClientConnections == 2
    assert counters.CountTime == START  # a new process is no reset
    assert (counters.WorkerRestarts, counters.worker_restarts(1)) == (1, 1)
    assert counters.worker_pid(1) == 1240


def test_the_tls_status_of_the_totals_is_the_latest_change(three: tuple[Counters, Totals]) -> None:
    counters, totals = three
    first, second, _ = totals.workers
    first.set_backend_tls(1, START + 5, "working")
    second.set_backend_tls(2, START + 9, "failing: certificate verify failed (look at tls_ca_file)")
    totals.update()
    assert counters.backend_tls() == (
        2,
        START + 9,
        "failing: certificate verify failed (look at tls_ca_file)",
    )
    first.set_backend_tls(1, START + 20, "working")
    totals.update()
    assert counters.backend_tls() == (1, START + 20, "working")  # not a leftover of the longer


def test_totals_start_keeps_the_supervisors_tls_status_and_zeroes_restarts(path: str) -> None:
    counters = stats.create_file(path, workers=2)
    counters.set_backend_tls(1, START, "working")  # the supervisor's start-up contact
    counters.WorkerRestarts = 3
    totals = Totals(counters)
    totals.start(LATER)
    totals.update()
    assert counters.backend_tls() == (1, START, "working") and counters.WorkerRestarts == 0
    assert (counters.StartTime, counters.CountTime) == (LATER, LATER)
    close_file(counters, totals)


# -- readers --------------------------------------------------------------------------------------


def test_a_reader_sums_the_blocks_exactly_between_the_supervisors_updates(
    three: tuple[Counters, Totals], path: str
) -> None:
    counters, totals = three
    first, _, third = totals.workers
    first.client_connected()
    totals.update()
    third.client_connected()
    third.client_connected()
    third.TotalClientLogins = 8
    counters.set_worker_pid(2, 777)
    counters.count_worker_restart(2)
    reading = stats.read_file(path)
    assert reading is not None and reading.worker_count() == 3
    assert reading.TotalClientLogins == 0  # the totals block: the last sample
    summed = reading.summed()
    assert summed["TotalClientLogins"] == 8 and summed["CurrentClientConnections"] == 3
    assert summed["PeakClientConnections"] == 3  # never below the current sum
    assert (summed["WorkerCount"], summed["WorkerRestarts"]) == (3, 1)
    rows = reading.worker_snapshots()
    assert [row["WorkerPid"] for row in rows] == [0, 0, 777]
    assert [row["WorkerRestarts"] for row in rows] == [0, 0, 1]
    assert [row["CurrentClientConnections"] for row in rows] == [1, 0, 2]
    assert rows[2]["StartTime"] == START + 1
    reading.release()


@pytest.mark.parametrize("size", [72, 120, 392])
def test_older_files_read_without_a_worker_table(path: str, size: int) -> None:
    """up-imapproxy's 72 bytes, our version 1 (to byte 120) and version 2 (392)."""
    counters = Counters.in_memory()
    counters.start(START)
    counters.TotalClientLogins = 5
    Path(path).write_bytes(bytes(counters.buffer[:size]))
    reading = stats.read_file(path)
    assert reading is not None and len(reading.buffer) == stats.FILE_SIZE
    assert reading.worker_count() == 0 and reading.WorkerRestarts == 0
    assert reading.summed() == reading.snapshot() and reading.worker_snapshots() == []
    assert reading.summed()["TotalClientLogins"] == 5


def test_a_table_cut_short_reads_the_whole_slots_it_has(path: str) -> None:
    counters = stats.create_file(path, workers=3)
    worker = counters.worker(1)
    worker.TotalClientLogins = 4
    worker.release()
    close_file(counters)
    data = file_bytes(path)
    for size, count in ((808 + 2 * 408 + 100, 2), (808 + 10, 0), (500, 0)):
        Path(path).write_bytes(data[:size])
        reading = stats.read_file(path)
        assert reading is not None and reading.worker_count() == count, size
        assert reading.summed()["TotalClientLogins"] == (4 if count else 0)
        reading.release()


def test_a_table_claiming_more_workers_than_the_file_holds(path: str) -> None:
    counters = stats.create_file(path, workers=2)
    close_file(counters)
    data = bytearray(file_bytes(path))
    data[396:400] = struct.pack("<I", 2**32 - 1)
    Path(path).write_bytes(bytes(data))
    reading = stats.read_file(path)
    assert reading is not None and reading.worker_count() == 2
    reading.release()


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # rewritten each time
@given(st.binary(min_size=72, max_size=4000))
def test_any_file_reads_without_an_error(tmp_path: Path, data: bytes) -> None:
    """Garbage (or a table half written) never breaks a reader: counts within what is there."""
    path = tmp_path / "garbage"
    table = b"IPXS" + struct.pack("<I", 2)
    data = data[:72] + table + data[80:392] + b"IPXW" + data[396:] if len(data) > 400 else data
    path.write_bytes(data)
    reading = stats.read_file(str(path))
    assert reading is not None
    count = reading.worker_count()
    assert 0 <= count <= max(0, (len(data) - 808) // 408)
    assert len(reading.summed()) >= 15 and len(reading.worker_snapshots()) == count
    reading.release()


FIELDS = stats.COUNTER_FIELDS + stats.EXTENSION_FIELDS
PEAKS = {  # peak -> its gauge
    "PeakClientConnections": "CurrentClientConnections",
    "PeakInUseServerConnections": "InUseServerConnections",
    "PeakRetainedServerConnections": "RetainedServerConnections",
}


def block_values() -> st.SearchStrategy[dict[str, int]]:
    counts = {name: st.integers(0, 2**32 - 1) for name in stats.COUNTER_FIELDS}
    extension = {name: st.integers(0, 2**64 - 1) for name in stats.EXTENSION_FIELDS}
    return st.fixed_dictionaries({**counts, **extension})


def wrapped_sum(name: str, blocks: list[dict[str, int]]) -> int:
    bits = 32 if name in stats.COUNTER_FIELDS else 64
    return sum(values[name] for values in blocks) & ((1 << bits) - 1)


@given(st.lists(block_values(), min_size=2, max_size=6), block_values())
def test_totals_are_the_sums_of_random_blocks(
    blocks: list[dict[str, int]], retired: dict[str, int]
) -> None:
    """Random values in every block: the totals block after update(), and a reader's summed(),
    are the sums (wrapped as the fields wrap); each peak is the current sum (the first sample)."""
    counters = Counters.in_memory(len(blocks))
    totals = Totals(counters)
    totals.start(START)
    retired = {**retired, **{gauge: 0 for gauge in PEAKS.values()}}  # an exited process: none
    everything = [retired, *blocks]
    for block, values in zip([totals.retired, *totals.workers], everything, strict=True):
        for name, value in values.items():
            setattr(block, name, value)
    totals.update()
    summed = counters.summed()
    for name in FIELDS:
        expected = wrapped_sum(PEAKS.get(name, name), everything)
        assert getattr(counters, name) == summed[name] == expected, name
    close_file(counters, totals)


def test_the_log_lines_of_the_totals_and_of_each_worker(three: tuple[Counters, Totals]) -> None:
    counters, totals = three
    totals.workers[0].client_connected()
    totals.workers[2].TotalClientLogins = 4
    counters.set_worker_pid(2, 99)
    counters.count_worker_restart(2)
    totals.update()
    assert stats.summary(counters).startswith("clients 1 (peak 1), active 0 (peak 0)")
    assert stats.workers_summary(counters) == (
        "workers restarted 1; "
        "worker 0 pid 0: clients 1, active 0, cached 0, logins 0, reused 0; "
        "worker 1 pid 0: clients 0, active 0, cached 0, logins 0, reused 0; "
        "worker 2 pid 99: clients 0, active 0, cached 0, logins 4, reused 0"
    )
    assert stats.workers_summary(Counters.in_memory()) == ""

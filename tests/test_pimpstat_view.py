"""pimpstat's pure view: statistics snapshots in, rows out; no curses, no terminal, no clock."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from imapproxy import stats
from pimpstat import app, view
from pimpstat.view import BLANK, Row
from tests.support.statsfile import close_file

START = 1_700_000_000  # Tue Nov 14 22:13:20 2023 UTC
RESET = START + 3600


def make_snapshot(values: dict[str, int], *, extension: bool) -> dict[str, int]:
    """A snapshot of our file (``extension``) or of up-imapproxy's 72-byte one."""
    counters = stats.Counters(bytearray(stats.FILE_SIZE))
    if extension:
        counters.mark_extension()
    counters.StartTime, counters.CountTime = START, RESET
    for name, value in values.items():
        setattr(counters, name, value)
    return counters.snapshot()


def snapshot(**values: int) -> dict[str, int]:
    return make_snapshot(values, extension=True)


def up_imapproxy_snapshot(**values: int) -> dict[str, int]:
    return make_snapshot(values, extension=False)


def numbered(**extra: int) -> dict[str, int]:
    """Every up-imapproxy counter set to its 1-based position in the struct."""
    values = {name: index for index, name in enumerate(stats.COUNTER_FIELDS, start=1)}
    return make_snapshot({**values, **extra}, extension=True)


def counters_view(source: view.Source, select_cache: bool = False) -> list[Row]:
    return view.counter_rows(source, select_cache_enabled=select_cache, localtime=time.gmtime)


def value_of(rows: list[Row], label: str) -> str:
    (row,) = [row for row in rows if row.label == label]
    return row.value


# -- pimpstat -c --------------------------------------------------------------------------------

UP_IMAPPROXY_LINES = (
    " 1 Current Client Connections\n"
    " 2 Peak Client Connections\n"
    " 3 In Use Connections\n"
    " 4 Peak In Use Connections\n"
    " 5 Retained Server Connections\n"
    " 6 Peak Retained Server Connections\n"
    " 7 Total Client Connections\n"
    " 8 Total Client Logins\n"
    " 10 Total Reused Connections\n"
    " 9 Total Created Connections\n"
    " 12 Cache Hits\n"
    " 13 Cache Misses\n"
)


def test_command_line_is_up_imapproxys_12_lines_reused_before_created() -> None:
    assert view.command_line_text(numbered()) == UP_IMAPPROXY_LINES


def test_command_line_leaves_out_select_commands_and_the_extension() -> None:
    with_extension = numbered(TotalLoginFailures=99, TotalCapacityRefusals=98)
    without = make_snapshot({n: i for i, n in enumerate(stats.COUNTER_FIELDS, 1)}, extension=False)
    assert view.command_line_text(with_extension) == view.command_line_text(without)
    assert view.command_line_text(without) == UP_IMAPPROXY_LINES


def test_command_line_prints_unsigned_counters_as_c_percent_d() -> None:
    text = view.command_line_text(
        snapshot(CurrentClientConnections=2**32 - 1, PeakClientConnections=2**31)
    )
    assert text.splitlines()[:2] == [
        " -1 Current Client Connections",
        " -2147483648 Peak Client Connections",
    ]
    assert view.c_int(2**31 - 1) == 2**31 - 1


def test_command_line_takes_a_counters_object() -> None:
    counters = stats.Counters.in_memory()
    counters.TotalClientLogins = 5
    assert " 5 Total Client Logins\n" in view.command_line_text(counters)


# -- counters -----------------------------------------------------------------------------------


def test_counters_are_up_imapproxys_screen_row_for_row() -> None:
    rows = counters_view(numbered(TotalServerConnectionsCreated=4, TotalClientLogins=9))
    assert rows == [
        Row("Server Start Time:", "Tue Nov 14 22:13:20 2023", "time"),
        Row("Last Counter Reset Time:", "Tue Nov 14 23:13:20 2023", "time"),
        BLANK,
        Row("CLIENT CONNECTIONS", kind="heading"),
        BLANK,
        Row("current:", "        1", beside=("peak:", "        2")),
        BLANK,
        Row("ACTIVE SERVER CONNECTIONS", kind="heading"),
        BLANK,
        Row("current:", "        3", beside=("peak:", "        4")),
        BLANK,
        Row("CACHED SERVER CONNECTIONS", kind="heading"),
        BLANK,
        Row("current:", "        5", beside=("peak:", "        6")),
        BLANK,
        Row("CONNECTION TOTALS", kind="heading"),
        BLANK,
        Row("client connections accepted:", "        7"),
        Row("client logins:", "        9"),
        Row("server connections created:", "        4"),
        Row("server connection reuses:", "       10"),
        Row("client login to server login ratio:", "     2.25 : 1"),
        BLANK,
        Row("SELECT CACHE NOT ENABLED", kind="heading"),
        BLANK,
        Row("IMAPPROXY TOTALS", kind="heading"),
        BLANK,
        Row("client login failures:", "        0"),
        Row("server connections expired:", "        0"),
        Row("server connections dropped:", "        0"),
        Row("client aborts resynced:", "        0"),
        Row("logins refused, cache full:", "        0"),
        Row("waits for the server:", "        0"),
    ]


@pytest.mark.parametrize(
    ("label", "screen_row"),
    [
        ("Server Start Time:", 2),
        ("CLIENT CONNECTIONS", 5),
        ("ACTIVE SERVER CONNECTIONS", 9),
        ("CACHED SERVER CONNECTIONS", 13),
        ("CONNECTION TOTALS", 17),
        ("client connections accepted:", 19),
        ("client login to server login ratio:", 23),
        ("SELECT CACHE TOTALS", 25),
        ("hit:", 27),
    ],
)
def test_counters_sit_on_up_imapproxys_screen_rows(label: str, screen_row: int) -> None:
    labels = [row.label for row in counters_view(numbered(), select_cache=True)]
    assert app.FIRST_ROW + labels.index(label) == screen_row


def test_select_cache_hits_and_misses_when_enabled() -> None:
    rows = counters_view(up_imapproxy_snapshot(SelectCacheHits=3, SelectCacheMisses=40), True)
    assert rows[-3:] == [
        Row("SELECT CACHE TOTALS", kind="heading"),
        BLANK,
        Row("hit:", "        3", beside=("miss:", "       40")),
    ]


def test_an_up_imapproxy_file_shows_no_extension_section() -> None:
    rows = counters_view(up_imapproxy_snapshot())
    assert rows[-1] == Row("SELECT CACHE NOT ENABLED", kind="heading")
    assert "IMAPPROXY TOTALS" not in [row.label for row in rows]


def test_extension_counters_are_shown_when_present() -> None:
    rows = counters_view(snapshot(TotalLoginFailures=3, TotalCapacityRefusals=2))
    assert value_of(rows, "client login failures:") == "        3"
    assert value_of(rows, "logins refused, cache full:") == "        2"


@pytest.mark.parametrize(
    ("logins", "created", "text"),
    [
        (0, 0, "          N/A"),
        (5, 0, "          N/A"),
        (7, 2, "     3.50 : 1"),
        (1, 3, "     0.33 : 1"),
    ],
)
def test_login_ratio_as_up_imapproxy(logins: int, created: int, text: str) -> None:
    assert view.ratio_text(logins, created) == text
    rows = counters_view(snapshot(TotalClientLogins=logins, TotalServerConnectionsCreated=created))
    assert value_of(rows, "client login to server login ratio:") == text


def test_numbers_are_percent_9d_but_unsigned() -> None:
    assert view.number_text(0) == "        0"
    assert view.number_text(2**32 - 1) == "4294967295"


@pytest.mark.parametrize("seconds", [0, 5 * 86400, START, 951_782_400, 1_704_067_199, 2**31 - 1])
def test_times_are_ctime_without_its_newline(seconds: int) -> None:
    assert view.ctime_text(time.gmtime(seconds)) == time.asctime(time.gmtime(seconds))


def test_a_time_local_time_cannot_represent_is_shown_as_such() -> None:
    def overflow(seconds: int) -> time.struct_time:
        raise OverflowError("timestamp out of range")

    assert view.time_text(2**62, overflow) == f"(invalid time {2**62})"


def test_counters_and_its_snapshot_give_the_same_rows() -> None:
    counters = stats.Counters.in_memory()
    counters.start(START)
    counters.TotalClientLogins = 4
    assert counters_view(counters) == counters_view(counters.snapshot())


# -- rates --------------------------------------------------------------------------------------


def rates_view(
    current: dict[str, int], previous: dict[str, int] | None, elapsed_s: float
) -> list[Row]:
    return view.rate_rows(current, previous, elapsed_s, select_cache_enabled=True)


def test_rates_per_second_over_the_interval() -> None:
    before = snapshot(TotalClientLogins=10, TotalServerConnectionsReused=4, TotalLoginFailures=1)
    after = snapshot(TotalClientLogins=16, TotalServerConnectionsReused=5, TotalLoginFailures=1)
    rows = rates_view(after, before, 2.0)
    assert rows[0] == Row("interval:", "2.00 s", "info")
    assert value_of(rows, "client logins:") == "     3.00 /s"
    assert value_of(rows, "server connection reuses:") == "     0.50 /s"
    assert value_of(rows, "client connections accepted:") == "     0.00 /s"
    assert value_of(rows, "client login failures:") == "     0.00 /s"


def test_no_rates_without_an_earlier_reading() -> None:
    rows = rates_view(snapshot(TotalClientLogins=3), None, 0.0)
    assert rows[0] == Row("interval:", "waiting for a second reading", "info")
    assert value_of(rows, "client logins:") == "N/A"


@pytest.mark.parametrize(
    ("previous", "elapsed_s"),
    [
        ({"TotalClientLogins": 9}, 1.0),  # went down
        ({"CountTime": RESET - 1}, 1.0),  # XPROXY_RESETCOUNTERS in between
        ({"StartTime": START - 1}, 1.0),  # the proxy restarted
        ({}, 0.0),  # no time passed
    ],
)
def test_no_rate_across_a_reset_or_a_fall(previous: dict[str, int], elapsed_s: float) -> None:
    current = snapshot(TotalClientLogins=5)
    before = {**snapshot(TotalClientLogins=2), **previous}
    assert view.rate(current, before, "TotalClientLogins", elapsed_s) is None
    assert value_of(rates_view(current, before, elapsed_s), "client logins:") == "N/A"


def test_extension_rates_only_when_the_file_has_them() -> None:
    ours = [row.label for row in rates_view(snapshot(), snapshot(), 1.0)]
    theirs = [
        row.label for row in rates_view(up_imapproxy_snapshot(), up_imapproxy_snapshot(), 1.0)
    ]
    assert "client login failures:" in ours
    assert "client login failures:" not in theirs
    assert "SELECT commands:" in theirs


@pytest.mark.parametrize(
    ("values", "connection", "select"),
    [
        ({}, "N/A", "N/A"),
        ({"TotalClientLogins": 4, "TotalServerConnectionsReused": 3}, "75.0 %", "N/A"),
        ({"SelectCacheHits": 1, "SelectCacheMisses": 3}, "N/A", "25.0 %"),
    ],
)
def test_hit_ratios(values: dict[str, int], connection: str, select: str) -> None:
    rows = rates_view(make_snapshot(values, extension=True), None, 0.0)
    assert value_of(rows, "connection cache (reuses / logins):") == connection
    assert value_of(rows, "SELECT cache (hits / SELECTs looked up):") == select


def test_select_hit_ratio_says_when_the_cache_is_off() -> None:
    rows = view.rate_rows(snapshot(SelectCacheHits=1), None, 0.0, select_cache_enabled=False)
    assert value_of(rows, "SELECT cache (hits / SELECTs looked up):") == "not enabled"


# -- about, waiting, help -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "text"),
    [
        (None, "not readable yet"),
        (snapshot(), "imapproxy (up-imapproxy's 72 bytes + extension)"),
        (up_imapproxy_snapshot(), "up-imapproxy 1.2.8 (72 bytes, no extension)"),
    ],
)
def test_about_names_the_files_and_the_format(source: dict[str, int] | None, text: str) -> None:
    rows = view.about_rows(
        version="9.9",
        config_path="/etc/imapproxy.conf",
        stat_filename="/var/run/pimpstats",
        select_cache_enabled=False,
        source=source,
    )
    assert value_of(rows, "file format:") == text
    assert value_of(rows, "statistics file (read-only):") == "/var/run/pimpstats"
    assert value_of(rows, "configuration file:") == "/etc/imapproxy.conf"
    assert value_of(rows, "version:") == "imapproxy 9.9"
    assert [value_of(rows, key) for key in ("q", "r", "m")] == [
        "quit",
        "redraw",
        "menu: choose the view",
    ]
    assert [value_of(rows, name) for name in view.VIEWS] == [
        view.VIEW_TITLES[n] for n in view.VIEWS
    ]


def test_waiting_rows_say_which_file_and_why() -> None:
    rows = view.waiting_rows("/var/run/pimpstats", "No such file or directory")
    assert rows[0] == Row("WAITING FOR THE STATISTICS FILE", kind="heading")
    assert value_of(rows, "file:") == "/var/run/pimpstats"
    assert value_of(rows, "problem:") == "No such file or directory"


def test_help_line_lists_the_keys() -> None:
    assert view.help_line() == "q quit  r redraw  m menu"


# -- layout and purity ----------------------------------------------------------------------------


def test_figures_fit_before_the_value_column_and_beside_column() -> None:
    """At up-imapproxy's columns no label runs into its value or the "peak:" column."""
    rows = counters_view(numbered(), True) + rates_view(numbered(), numbered(), 1.0)
    for row in rows:
        if row.kind == "field" and row.beside is None:
            assert app.LABEL_COL + len(row.label) < app.VALUE_END_COL - len(row.value), row
        elif row.beside is not None:
            assert app.PAIR_VALUE_COL + len(row.value) < app.BESIDE_LABEL_COL, row


def test_the_backend_tls_status_in_the_file_and_the_about_view(tmp_path: Path) -> None:
    path = str(tmp_path / "pimpstats")
    counters = stats.create_file(path)
    counters.start(START)
    counters.set_backend_tls(2, START, "failing: certificate verify failed (look at tls_ca_file)")
    counters.start(RESET)  # the proxy starts serving after its first contact: kept
    counters.TotalClientLogins = 7
    monitor = app.Monitor("/etc/imapproxy.conf", path, False, view="about")
    monitor.read(0.0)
    rows = monitor.rows()
    assert value_of(rows, "TLS with the IMAP server:") == (
        "failing: certificate verify failed (look at tls_ca_file)"
    )
    counters.set_backend_tls(1, RESET, "é" * 200)  # cut at the field's size, on a character
    reading = stats.read_file(path)
    assert reading is not None and reading.backend_tls() == (1, RESET, "é" * 124)
    assert reading.TotalClientLogins == 7
    counters.release()


@pytest.mark.parametrize(
    ("backend_tls", "text"),
    [(None, "not readable yet"), ((0, 0, ""), "not tried"), ((1, 5, ""), "working")],
)
def test_backend_tls_text(backend_tls: tuple[int, int, str] | None, text: str) -> None:
    assert view.backend_tls_text(backend_tls) == text


def test_a_version_1_file_reads_as_not_tried() -> None:
    counters = stats.Counters(bytearray(stats.FILE_SIZE))
    counters.mark_extension()
    counters.buffer[76:80] = (1).to_bytes(4, "little")
    counters.buffer[136:140] = b"junk"
    assert counters.has_extension() and counters.backend_tls() == (0, 0, "")


# -- workers ------------------------------------------------------------------------------------


def worker_file(path: str) -> tuple[stats.Counters, stats.Totals]:
    """Two workers (pids 101 and 102, worker 1 restarted once) and a worker that exited."""
    counters = stats.create_file(path, workers=2)
    totals = stats.Totals(counters)
    totals.start(START)
    first, second = totals.workers
    for worker, logins, reused in ((first, 8, 6), (second, 4, 1)):
        worker.start(START + 1)
        worker.client_connected()
        worker.set_server_connections(1, 3)
        worker.TotalClientLogins, worker.TotalServerConnectionsReused = logins, reused
    second.client_connected()
    totals.retired.TotalClientLogins = 20  # the workers that exited logged 20 in
    counters.set_worker_pid(0, 101)
    counters.set_worker_pid(1, 102)
    counters.count_worker_restart(1)
    return counters, totals


def test_the_workers_view_has_a_line_per_worker_and_the_totals(tmp_path: Path) -> None:
    path = str(tmp_path / "pimpstats")
    counters, totals = worker_file(path)
    monitor = app.Monitor("/etc/imapproxy.conf", path, False, view="workers")
    monitor.read(0.0)  # before any Totals.update(): the reader sums the blocks itself
    assert monitor.rows() == [
        Row("WORKER PROCESSES", kind="heading"),
        BLANK,
        Row(
            "worker     pid clients  active  cached     logins     reused    hits restarts",
            kind="heading",
        ),
        Row(
            "     0     101       1       1       3          8          6  75.0 %        0",
            "",
            "text",
        ),
        Row(
            "     1     102       2       1       3          4          1  25.0 %        1",
            "",
            "text",
        ),
        Row(
            " total               3       2       6         32          7  21.9 %        1",
            "",
            "text",
        ),
        BLANK,
        Row("workers restarted after dying:", "        1"),
    ]
    totals.worker_exited(0)
    monitor.read(1.0)
    assert monitor.rows()[3].label.split()[:3] == ["0", "-", "0"]  # an empty slot
    assert monitor.rows()[5].label.split()[4] == "32"  # its logins stay in the totals
    close_file(counters, totals)


def test_the_counters_and_dash_c_show_every_workers_totals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "pimpstats")
    counters, totals = worker_file(path)
    monitor = app.Monitor("/etc/imapproxy.conf", path, False)
    monitor.read(0.0)
    rows = monitor.rows()
    assert value_of(rows, "client logins:") == "       32"
    assert value_of(rows, "server connection reuses:") == "        7"
    assert app.print_counters(path) == 0
    assert " 32 Total Client Logins\n 7 Total Reused Connections\n" in capsys.readouterr().out
    close_file(counters, totals)


def test_a_file_without_a_worker_table_says_so_in_the_workers_view() -> None:
    rows = view.worker_rows(snapshot(), [])
    assert [row.label for row in rows] == [
        "WORKER PROCESSES",
        "",
        "One process: this statistics file has no worker table",
        "(workers 1, or a file of up-imapproxy's).",
    ]


def test_the_workers_table_fits_an_80_column_screen() -> None:
    widest = ["1023", "4194304", *["9999999"] * 3, *["4294967295"] * 2, "100.0 %", "99999999"]
    line = view.worker_line(widest)
    assert len(line) == 80 - 1 - app.HEADING_COL  # inside the border, every cell in its column
    assert line.split() == [*widest[:7], "100.0", "%", widest[8]]


@pytest.mark.parametrize(
    ("values", "fmt", "workers"),
    [
        (
            {"WorkerCount": 2},
            "imapproxy (up-imapproxy's 72 bytes + extension + worker table)",
            "2 (a supervisor and 2 worker processes)",
        ),
        ({}, "imapproxy (up-imapproxy's 72 bytes + extension)", "1 (one process)"),
    ],
)
def test_about_says_how_many_workers_the_file_has(
    values: dict[str, int], fmt: str, workers: str
) -> None:
    rows = view.about_rows(
        version="9.9",
        config_path="/etc/imapproxy.conf",
        stat_filename="/var/run/pimpstats",
        select_cache_enabled=False,
        source={**snapshot(), **values},
    )
    assert value_of(rows, "file format:") == fmt
    assert value_of(rows, "workers:") == workers

"""``pimpstat [-f config] [-c]``: the monitor of imapproxy's statistics file (curses front end).

It reads ``stat_filename`` (and ``enable_select_cache``) from the proxy's configuration file and
reads the statistics file read-only, a fresh snapshot per refresh (``stats.read_file``); it never
writes. A file written by up-imapproxy 1.2.8 reads as well (without our extension counters). With
``workers N`` every view shows the totals of all workers, summed from their blocks at each
reading (``Counters.summed``), and the ``workers`` view each worker's figures.

* ``-c`` prints up-imapproxy's 12 lines once, byte for byte as its ``pimpstat -c``.
* Otherwise a curses screen, refreshed every second (a ``getch`` timeout, not a busy loop), with
  up-imapproxy's layout (its row and column positions, from ``pimpstat.c``). Keys: ``q`` quits,
  ``r`` redraws, ``m`` opens a curses-menu to choose the view (``pimpstat.view.VIEWS``); Ctrl-C
  quits too. A resize redraws to the new size, clipping what does not fit. A missing, unreadable
  or short file shows why and is read again every second.

Exit status: 0; 2 for a bad option; 78 (``EX_CONFIG``) when the configuration file is missing,
unreadable or wrong, as the proxy; with ``-c``, 66 (``EX_NOINPUT``) when the statistics file is
missing, unreadable or shorter than 72 bytes (up-imapproxy exits 1); 1 when the terminal cannot
be driven by curses.
"""

from __future__ import annotations

import argparse
import contextlib
import curses
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cursesmenu import CursesMenu
from cursesmenu.items.selection_item import SelectionItem

from imapproxy import __version__, stats
from imapproxy import config as config_module
from imapproxy.errors import ConfigError
from imapproxy.health import ServerLine, parse_servers, servers_path
from pimpstat import view
from pimpstat.view import Row

EX_NOINPUT = 66  # sysexits.h
EX_TERMINAL = 1  # up-imapproxy: "failed to initialize screen -- exiting."
REFRESH_S = 1.0  # up-imapproxy's pimpstat: sleep( 1 ); also the interval of the rates
MENU_POLL_MS = 200  # how soon the menu notices a resize
ESC_DELAY_MS = 25  # Escape leaves the menu without curses' default 1 s wait

# Screen positions of up-imapproxy's pimpstat.c (row, column), kept so that its users find
# every figure where they know it.
FIRST_ROW = 2
HEADING_COL = 2
LABEL_COL = 5
PAIR_VALUE_COL = 14  # "current:" values
BESIDE_LABEL_COL = 40  # "peak:"
BESIDE_VALUE_COL = 46
VALUE_END_COL = 55  # "%9d" values at column 46 end here; so do the ratio and the times
TIME_LABEL_END_COL = 26  # "Server Start Time:" at 8, "Last Counter Reset Time:" at 2
TIME_VALUE_COL = 31
INFO_VALUE_COL = 35  # ours: texts (about, waiting), left-aligned
MENU_MIN_ROWS, MENU_MIN_COLS = 5, 44  # below this curses-menu cannot draw its items


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pimpstat",
        usage="pimpstat [-f config filename] [-h] [-c]",
        description="Show the statistics of a running imapproxy (or up-imapproxy).",
    )
    parser.add_argument(
        "-f",
        dest="config",
        default=config_module.DEFAULT_CONFIG_PATH,
        metavar="CONFIG",
        help="configuration file naming stat_filename (default: %(default)s)",
    )
    parser.add_argument(
        "-c",
        dest="command_line",
        action="store_true",
        help="print the 12 counters once, as up-imapproxy's pimpstat -c, instead of curses",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = config_module.load(args.config)
    except ConfigError as error:
        print(f"pimpstat: {error}", file=sys.stderr)
        return config_module.EX_CONFIG
    if args.command_line:
        return print_counters(config.stat_filename)
    monitor = Monitor(args.config, config.stat_filename, config.enable_select_cache)
    return run_curses(monitor)


def print_counters(stat_filename: str) -> int:
    """``-c``: up-imapproxy's 12 lines on stdout, or why the file cannot be read on stderr."""
    counters = stats.read_file_or_reason(stat_filename)
    if isinstance(counters, str):
        print(f"pimpstat: cannot read statistics file {stat_filename}: {counters}", file=sys.stderr)
        return EX_NOINPUT
    sys.stdout.write(view.command_line_text(counters.summed()))  # every worker's, exactly
    counters.release()
    return 0


# -- the model: readings of the file ------------------------------------------------------------


@dataclass
class Monitor:
    """What is on screen: the last two readings of the file, and the chosen view."""

    config_path: str
    stat_filename: str
    select_cache_enabled: bool
    view: str = "counters"
    current: dict[str, int] | None = None
    previous: dict[str, int] | None = None  # the reading before, for the rates
    elapsed_s: float = 0.0  # between the two
    problem: str = "not read yet"  # why there is no current reading
    backend_tls: tuple[int, int, str] | None = None  # from the current reading
    workers: list[dict[str, int]] = field(default_factory=list)  # each worker's, if any
    _read_at: float | None = field(default=None, repr=False)

    def servers(self) -> list[ServerLine] | None:
        """The servers file's lines (None if it cannot be read: an older proxy, or none)."""
        try:
            with open(servers_path(self.stat_filename), encoding="utf-8", errors="replace") as f:
                return parse_servers(f.read())
        except OSError:
            return None

    def read(self, now: float) -> None:
        """Read the file (``now`` on a monotonic clock); a failed read forgets both readings."""
        counters = stats.read_file_or_reason(self.stat_filename)
        if isinstance(counters, str):
            self.current = self.previous = self._read_at = self.backend_tls = None
            self.workers = []
            self.problem = counters
            return
        self.previous, self.current = self.current, counters.summed()
        self.workers = counters.worker_snapshots()
        self.backend_tls = counters.backend_tls()
        counters.release()
        self.elapsed_s = 0.0 if self._read_at is None else now - self._read_at
        self._read_at = now

    def rows(self) -> list[Row]:
        if self.view == "servers":
            return view.server_rows(
                self.servers(), servers_path(self.stat_filename), time.localtime
            )
        if self.view == "about":
            return view.about_rows(
                version=__version__,
                config_path=self.config_path,
                stat_filename=self.stat_filename,
                select_cache_enabled=self.select_cache_enabled,
                source=self.current,
                backend_tls=self.backend_tls,
            )
        if self.current is None:
            return view.waiting_rows(self.stat_filename, self.problem)
        if self.view == "workers":
            return view.worker_rows(self.current, self.workers)
        enabled = self.select_cache_enabled
        if self.view == "rates":
            return view.rate_rows(
                self.current, self.previous, self.elapsed_s, select_cache_enabled=enabled
            )
        return view.counter_rows(
            self.current, select_cache_enabled=enabled, localtime=time.localtime
        )


# -- the screen ---------------------------------------------------------------------------------


def run_curses(monitor: Monitor) -> int:
    os.environ.setdefault("ESCDELAY", str(ESC_DELAY_MS))
    # The size must come from the terminal, not from LINES/COLUMNS, which ncurses prefers: exported
    # by a shell, or by a parent using GNU readline (behind os.environ's back), they are stale.
    for name in ("LINES", "COLUMNS"):
        os.environ.pop(name, None)
        os.unsetenv(name)
    try:
        curses.wrapper(main_loop, monitor)  # restores the terminal on any exit
    except KeyboardInterrupt:  # Ctrl-C: up-imapproxy's way to quit, so a clean exit
        return 0
    except curses.error as error:
        print(f"pimpstat: cannot drive this terminal with curses: {error}", file=sys.stderr)
        return EX_TERMINAL
    return 0


def main_loop(screen: Any, monitor: Monitor) -> None:
    """Read and draw every ``REFRESH_S``; between readings wait for a key, no longer."""
    set_modes(screen)
    next_read = 0.0
    while True:
        now = time.monotonic()
        if now >= next_read:
            monitor.read(now)
            next_read = now + REFRESH_S
            draw(screen, monitor)
        screen.timeout(max(1, round((next_read - time.monotonic()) * 1000)))
        key = screen.getch()
        if key in (ord("q"), ord("Q")):
            return
        if key in (ord("r"), ord("R"), curses.KEY_RESIZE, ord("m"), ord("M")):
            handle_key(screen, monitor, key)


def handle_key(screen: Any, monitor: Monitor, key: int) -> None:
    if key in (ord("m"), ord("M")):
        monitor.view = choose_view(screen, monitor.view)
    if key == curses.KEY_RESIZE:
        curses.update_lines_cols()
    screen.clear()  # the next refresh repaints the whole terminal
    draw(screen, monitor)


def set_modes(screen: Any) -> None:
    """Our terminal modes, set again after the menu, which leaves its own."""
    curses.noecho()
    curses.cbreak()
    screen.keypad(True)
    with contextlib.suppress(curses.error):  # a terminal that cannot hide the cursor
        curses.curs_set(0)


def draw(screen: Any, monitor: Monitor) -> None:
    """The whole screen from the monitor's rows; anything outside the window is clipped."""
    screen.erase()
    height, _ = screen.getmaxyx()
    _safely(screen.border)
    put(screen, 0, 2, f" pimpstat: {monitor.view} ")
    for index, row in enumerate(monitor.rows()):
        if FIRST_ROW + index >= height - 1:
            break
        draw_row(screen, FIRST_ROW + index, row)
    put(screen, height - 1, 2, f" {view.help_line()} ", curses.A_REVERSE)
    screen.refresh()


def draw_row(screen: Any, y: int, row: Row) -> None:
    """One row at up-imapproxy's columns (``FIRST_ROW`` ... ``TIME_VALUE_COL``)."""
    if row.kind in ("heading", "text"):
        put(screen, y, HEADING_COL, row.label, curses.A_BOLD if row.kind == "heading" else 0)
    elif row.kind == "time":
        put(screen, y, max(HEADING_COL, TIME_LABEL_END_COL - len(row.label)), row.label)
        put(screen, y, TIME_VALUE_COL, row.value)
    elif row.kind == "field" and row.beside is not None:
        put(screen, y, LABEL_COL, row.label)
        put(screen, y, max(PAIR_VALUE_COL, LABEL_COL + len(row.label) + 1), row.value)
        put(screen, y, BESIDE_LABEL_COL, row.beside[0])
        put(screen, y, BESIDE_VALUE_COL, row.beside[1])
    elif row.kind == "info":
        put(screen, y, LABEL_COL, row.label)
        value_col = max(INFO_VALUE_COL, LABEL_COL + len(row.label) + 1)
        put(screen, y, value_col, tail(row.value, screen.getmaxyx()[1] - 1 - value_col))
    elif row.kind == "field":
        put(screen, y, LABEL_COL, row.label)
        value_end = min(VALUE_END_COL, screen.getmaxyx()[1] - 2)  # narrow: values stay in sight
        value_col = max(value_end - len(row.value), LABEL_COL + len(row.label) + 1)
        put(screen, y, value_col, row.value)


def tail(text: str, room: int) -> str:
    """``text``, or ``...`` and its end when it is longer than ``room`` (paths end in the name)."""
    if len(text) <= room:
        return text
    return "..." + text[len(text) - room + 3 :] if room > 3 else text[:room]


def put(screen: Any, y: int, x: int, text: str, attr: int = 0) -> None:
    """``addstr`` clipped to the window, its right border column kept free."""
    height, width = screen.getmaxyx()
    room = width - 1 - x
    if not 0 <= y < height or room <= 0:
        return
    _safely(screen.addstr, y, x, text[:room], attr)


def _safely(call: Any, *args: Any) -> None:
    with contextlib.suppress(curses.error):  # the bottom-right cell; too small for a border
        call(*args)


# -- the menu -----------------------------------------------------------------------------------


class ViewMenu(CursesMenu):
    """curses-menu's menu on the screen we already drive.

    ``CursesMenu.show()`` would run its own ``initscr()``/``endwin()``, print escape codes to
    stdout and register an ``atexit`` that runs ``reset``; a menu whose loop runs on the shared
    ``CursesMenu.stdscr`` (what curses-menu does for a submenu) avoids all three. curses-menu
    0.9 API: ``_wrap_start`` is the body of its menu thread.
    """

    def __init__(self, title: str, subtitle: str) -> None:
        super().__init__(title, subtitle, show_exit_item=False)

    def _wrap_start(self) -> None:
        try:
            self._main_loop()
        except curses.error:  # the terminal changed under the menu: back to the main loop
            self.returned_value = None

    def on_resize(self, _key: int = 0) -> None:
        """Redraw, or close when too small. Not curses-menu's: its ``resizeterm`` call pushes
        another KEY_RESIZE on a tiny terminal, and it then spins."""
        curses.update_lines_cols()
        if curses.LINES < MENU_MIN_ROWS or curses.COLS < MENU_MIN_COLS:
            self.returned_value, self.should_exit = None, True
            return
        self.draw()

    def _set_up_colors(self) -> None:
        try:
            super()._set_up_colors()
        except curses.error:  # no colours: reverse video for the highlighted item
            self.highlight = curses.A_REVERSE


def view_menu(current: str) -> ViewMenu:
    """One item per view, then "back"; ``q`` and Escape close it too, keeping ``current``."""
    menu = ViewMenu("pimpstat: choose the view", "Enter selects; q or Esc goes back")
    for index, name in enumerate(view.VIEWS):
        text = f"{name}: {view.VIEW_TITLES[name]}"
        menu.items.append(SelectionItem(text, index, should_exit=True))
    here = view.VIEWS.index(current)
    menu.items.append(SelectionItem(f"back to {current}", here, should_exit=True))
    for key in (ord("q"), 27):  # curses-menu's own q only moves to the last item
        menu.user_input_handlers[key] = lambda _key: setattr(menu, "should_exit", True)
    menu.current_option = here  # the highlight starts on the view shown
    return menu


def choose_view(screen: Any, current: str) -> str:
    """Run the view menu to its end on our screen; the chosen view, or ``current``."""
    height, width = screen.getmaxyx()
    if height < MENU_MIN_ROWS or width < MENU_MIN_COLS:
        curses.beep()
        return current
    menu = view_menu(current)
    CursesMenu.stdscr = screen
    # The menu's thread polls: a thread blocked in getch would miss a resize (SIGWINCH goes to the
    # main thread), and a short timeout would spin. The main loop sets its own timeout again.
    screen.timeout(MENU_POLL_MS)
    screen.erase()
    try:
        chosen = menu.show()
    except KeyboardInterrupt:
        menu.exit(timeout=1)  # its thread must be done with curses before the terminal is restored
        raise
    set_modes(screen)
    return current if chosen is None else view.VIEWS[chosen]


if __name__ == "__main__":
    sys.exit(main())

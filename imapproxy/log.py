"""Logging: syslog as up-imapproxy does it, or stderr in the foreground.

The logger is ``imapproxy``. With syslog, the ident is ``in.imapproxyd`` with the pid (as
up-imapproxy: ``openlog(PGM, LOG_PID, facility)``), the facility is ``syslog_facility`` and
``syslog_prioritymask LOG_X`` keeps priorities up to X. In the foreground the same mask applies
to stderr. Messages never carry passwords: callers log user names and fixed texts only.
"""

from __future__ import annotations

import logging
import os
import sys
import syslog
from typing import TextIO

from imapproxy.config import Config

LOGGER = logging.getLogger("imapproxy")

# Two lines per webmail page: spare each record the stack walk for its caller and the
# thread/process lookups (a getpid system call each) that no line of ours prints.
logging._srcfile = None
logging.logThreads = False
logging.logProcesses = False
logging.logMultiprocessing = False
SYSLOG_IDENT = "in.imapproxyd"
NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")

# syslog priority -> the lowest logging level still shown under LOG_UPTO(priority)
_MASK_LEVEL = {
    "LOG_EMERG": logging.CRITICAL,
    "LOG_ALERT": logging.CRITICAL,
    "LOG_CRIT": logging.CRITICAL,
    "LOG_ERR": logging.ERROR,
    "LOG_WARNING": logging.WARNING,
    "LOG_NOTICE": NOTICE,
    "LOG_INFO": logging.INFO,
    "LOG_DEBUG": logging.DEBUG,
}


def _syslog_priority(level: int) -> int:
    if level >= logging.CRITICAL:
        return syslog.LOG_CRIT
    if level >= logging.ERROR:
        return syslog.LOG_ERR
    if level >= logging.WARNING:
        return syslog.LOG_WARNING
    if level >= NOTICE:
        return syslog.LOG_NOTICE
    return syslog.LOG_INFO if level >= logging.INFO else syslog.LOG_DEBUG


class SyslogHandler(logging.Handler):
    """Through libc's syslog(3), like up-imapproxy (no socket handling of our own)."""

    def __init__(self, facility: str) -> None:
        super().__init__()
        syslog.openlog(SYSLOG_IDENT, syslog.LOG_PID | syslog.LOG_NDELAY, getattr(syslog, facility))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            syslog.syslog(_syslog_priority(record.levelno), self.format(record))
        except Exception:  # a logging failure must never take a client down
            self.handleError(record)


class _Formatter(logging.Formatter):
    """The foreground format, with the time text made once a second, not once a line."""

    _second = -1
    _text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._second, self._text = second, super().formatTime(record, datefmt)
        return self._text


def _lighter_records() -> None:
    """Log records without what no line of ours shows: the caller's file and line (a walk of
    the stack), the thread, the process (a getpid call: the pid is in the format already).
    The logging HOWTO's "Optimization" settings; two lines are written per webmail page."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def setup(config: Config, *, foreground: bool, stream: TextIO | None = None) -> None:
    """Route the ``imapproxy`` logger to syslog, or to ``stream`` (stderr) in the foreground."""
    _lighter_records()
    for old in list(LOGGER.handlers):
        LOGGER.removeHandler(old)
        old.close()
    handler: logging.Handler
    if foreground:
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(_stream_formatter())
    else:
        handler = SyslogHandler(config.syslog_facility)
    LOGGER.addHandler(handler)
    LOGGER.propagate = False
    set_mask(config)


def _stream_formatter() -> logging.Formatter:
    return _Formatter(
        f"%(asctime)s {SYSLOG_IDENT}[{os.getpid()}]: %(message)s", "%Y-%m-%d %H:%M:%S"
    )


def forked() -> None:
    """In a worker process (``workers N``): its own pid in the lines (syslog adds it itself)."""
    for handler in LOGGER.handlers:
        if isinstance(handler.formatter, _Formatter):
            handler.setFormatter(_stream_formatter())


def host_port(host: object, port: object) -> str:
    """``host:port`` for logs; an IPv6 address in brackets, ``[::1]:143`` (RFC 3986 §3.2.2),
    an IPv4-mapped one (a dual-stack listener's IPv4 client) as plain IPv4, so that IPv4 lines
    stay as up-imapproxy writes them."""
    text = str(host)
    if text.startswith("::ffff:") and "." in text:
        text = text[len("::ffff:") :]
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def set_mask(config: Config) -> None:
    """Apply ``syslog_prioritymask`` (at start-up, and live on SIGHUP)."""
    mask = config.syslog_prioritymask
    LOGGER.setLevel(_MASK_LEVEL[mask] if mask else logging.DEBUG)

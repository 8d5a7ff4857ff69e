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
import time
from typing import Any, TextIO

from imapproxy.config import Config

SYSLOG_IDENT = "in.imapproxyd"
NOTICE = 25
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
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

    def line(self, level: int, text: str) -> None:
        """``text`` as ``emit`` writes a record's message (``_ProxyLogger``'s short way)."""
        syslog.syslog(_syslog_priority(level), text)


class _Formatter(logging.Formatter):
    """The foreground format, with the time text made once a second, not once a line."""

    _second = -1
    _text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._second, self._text = second, super().formatTime(record, datefmt)
        return self._text


class _StreamHandler(logging.StreamHandler):
    """stderr in the foreground: ``"<time> in.imapproxyd[<pid>]: <message>"`` per line."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._prefix = ""
        self._second = -1
        self.stamp()

    def stamp(self) -> None:
        """The pid in the lines: this process's (again after a worker's fork)."""
        self._ident = f" {SYSLOG_IDENT}[{os.getpid()}]: "
        self.setFormatter(_Formatter(f"%(asctime)s{self._ident}%(message)s", TIME_FORMAT))

    def line(self, level: int, text: str) -> None:
        """What ``emit`` writes for a record whose message is ``text``, made without one."""
        now = time.time()
        second = int(now)
        if second != self._second:  # the time text made once a second, as ``_Formatter``
            self._second = second
            self._prefix = time.strftime(TIME_FORMAT, time.localtime(now)) + self._ident
        with self.lock:  # type: ignore[union-attr]
            self.stream.write(self._prefix + text + "\n")
            self.stream.flush()


class _ProxyLogger(logging.Logger):
    """The ``imapproxy`` logger, with a short way for a plain line.

    Two lines are written per webmail page, and the stdlib's way (a ``LogRecord``, filters,
    handler locks, a formatter) costs some thirty Python calls each. Once ``setup`` has given
    the logger its one handler of ours (``fast``), ``info``, ``warning`` and ``log`` with
    positional arguments only write the message through that handler's ``line``: the same
    text, a few calls. Anything else (``exception``, ``exc_info``, a mapping argument, a
    logger without our handler, as in tests) takes the stdlib's way.
    """

    fast: _StreamHandler | SyslogHandler | None = None

    def _line(self, level: int, msg: object, args: tuple[object, ...]) -> bool:
        handler = self.fast
        if handler is None or (args and len(args) == 1 and isinstance(args[0], dict)):
            return False
        try:
            text = str(msg) % args if args else str(msg)
            handler.line(level, text)
        except Exception:  # the stdlib's way reports it (``handleError``)
            return False
        return True

    def info(self, msg: object, *args: object, **kwargs: Any) -> None:
        if self.isEnabledFor(logging.INFO) and (kwargs or not self._line(logging.INFO, msg, args)):
            self._log(logging.INFO, msg, args, **kwargs)

    def warning(self, msg: object, *args: object, **kwargs: Any) -> None:
        if self.isEnabledFor(logging.WARNING) and (
            kwargs or not self._line(logging.WARNING, msg, args)
        ):
            self._log(logging.WARNING, msg, args, **kwargs)

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if self.isEnabledFor(level) and (kwargs or not self._line(level, msg, args)):
            self._log(level, msg, args, **kwargs)


def _proxy_logger() -> _ProxyLogger:
    logger = logging.getLogger("imapproxy")
    if not isinstance(logger, _ProxyLogger):  # made before this module was imported
        logger.__class__ = _ProxyLogger
    assert isinstance(logger, _ProxyLogger)
    return logger


LOGGER = _proxy_logger()


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
    LOGGER.fast = None
    for old in list(LOGGER.handlers):
        LOGGER.removeHandler(old)
        old.close()
    handler: _StreamHandler | SyslogHandler
    if foreground:
        handler = _StreamHandler(stream or sys.stderr)
    else:
        handler = SyslogHandler(config.syslog_facility)
    LOGGER.addHandler(handler)
    LOGGER.propagate = False
    LOGGER.fast = handler
    set_mask(config)


def forked() -> None:
    """In a worker process (``workers N``): its own pid in the lines (syslog adds it itself)."""
    for handler in LOGGER.handlers:
        if isinstance(handler, _StreamHandler):
            handler.stamp()


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

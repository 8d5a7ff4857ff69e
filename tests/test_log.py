"""The proxy's log lines: the short way (``log._ProxyLogger``) writes what the stdlib's would."""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Iterator

import pytest

from imapproxy import log
from imapproxy.config import Config

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d in\.imapproxyd\[(\d+)\]: (.*)$")


@pytest.fixture
def restore_logger() -> Iterator[None]:
    level, propagate = log.LOGGER.level, log.LOGGER.propagate
    yield
    for handler in list(log.LOGGER.handlers):
        log.LOGGER.removeHandler(handler)
    log.LOGGER.fast = None
    log.LOGGER.setLevel(level)
    log.LOGGER.propagate = propagate


def foreground(mask: str | None = None) -> io.StringIO:
    stream = io.StringIO()
    log.setup(Config(syslog_prioritymask=mask), foreground=True, stream=stream)
    return stream


def stdlib_line(message: str, *args: object) -> str:
    """The line the stdlib's way writes for the same call, through the same handler."""
    handler = log.LOGGER.fast
    assert isinstance(handler, logging.StreamHandler)
    record = log.LOGGER.makeRecord("imapproxy", logging.INFO, "", 0, message, args, None)
    return handler.format(record)


@pytest.mark.usefixtures("restore_logger")
def test_a_plain_line_is_the_stdlib_formatters_line() -> None:
    stream = foreground()
    args = ("alice", "127.0.0.1:40000", 7, " session=<abc>")
    log.LOGGER.info("LOGIN: '%s' (%s) on existing sd [%d]%s", *args)
    written = stream.getvalue()
    expected = stdlib_line("LOGIN: '%s' (%s) on existing sd [%d]%s", *args)
    assert written.endswith("\n") and written.count("\n") == 1
    match = LINE.match(written.rstrip("\n"))
    assert match is not None
    assert match.group(1) == str(os.getpid())
    assert match.group(2) == "LOGIN: 'alice' (127.0.0.1:40000) on existing sd [7] session=<abc>"
    assert written[19:] == expected[19:] + "\n"  # the same but for the second, maybe


@pytest.mark.usefixtures("restore_logger")
def test_the_mask_holds_on_the_short_way() -> None:
    stream = foreground("LOG_NOTICE")
    log.LOGGER.info("not shown %d", 1)
    log.LOGGER.log(log.NOTICE, "shown %s", "notice")
    log.LOGGER.warning("shown %s", "warning")
    lines = [LINE.match(line).group(2) for line in stream.getvalue().splitlines()]  # type: ignore[union-attr]
    assert lines == ["shown notice", "shown warning"]


@pytest.mark.usefixtures("restore_logger")
def test_what_the_short_way_does_not_take_goes_the_stdlib_way() -> None:
    stream = foreground()
    log.LOGGER.info("a mapping: %(user)s", {"user": "bob"})
    log.LOGGER.info("no arguments, a literal %s")
    try:
        raise ValueError("boom")
    except ValueError:
        log.LOGGER.exception("failed for %s", "carol")
    log.LOGGER.info("extra", extra={"x": 1})
    text = stream.getvalue()
    assert "a mapping: bob\n" in text
    assert "no arguments, a literal %s\n" in text
    assert "failed for carol\nTraceback" in text and "ValueError: boom" in text
    assert text.rstrip("\n").endswith("extra")


@pytest.mark.usefixtures("restore_logger")
def test_a_bad_format_is_reported_not_raised(capsys: pytest.CaptureFixture[str]) -> None:
    stream = foreground()
    log.LOGGER.info("two: %s %s", "only one")  # the stdlib's handleError reports it
    log.LOGGER.info("after %s", "it")
    assert stream.getvalue().rstrip("\n").endswith("after it")
    assert "--- Logging error ---" in capsys.readouterr().err


@pytest.mark.usefixtures("restore_logger")
def test_syslog_gets_the_message_and_its_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[int, str]] = []
    monkeypatch.setattr(log.syslog, "openlog", lambda *args: None)
    monkeypatch.setattr(log.syslog, "syslog", lambda priority, text: sent.append((priority, text)))
    log.setup(Config(), foreground=False)
    log.LOGGER.info("LOGOUT: '%s' from server sd [%d]", "alice", 9)
    log.LOGGER.log(log.NOTICE, "notice")
    log.LOGGER.warning("warned")
    assert sent == [
        (log.syslog.LOG_INFO, "LOGOUT: 'alice' from server sd [9]"),
        (log.syslog.LOG_NOTICE, "notice"),
        (log.syslog.LOG_WARNING, "warned"),
    ]


@pytest.mark.usefixtures("restore_logger")
def test_without_setup_the_stdlib_way_serves_caplog(caplog: pytest.LogCaptureFixture) -> None:
    log.LOGGER.fast = None
    log.LOGGER.propagate = True
    with caplog.at_level(logging.INFO, logger="imapproxy"):
        log.LOGGER.info("seen by %s", "caplog")
    assert caplog.messages == ["seen by caplog"]


@pytest.mark.usefixtures("restore_logger")
def test_a_forked_worker_writes_its_own_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = foreground()
    monkeypatch.setattr(log.os, "getpid", lambda: 4242)
    log.forked()
    log.LOGGER.info("from the worker")
    log.LOGGER.exception("and the stdlib's way")
    pids = [LINE.match(line).group(1) for line in stream.getvalue().splitlines()[:2]]  # type: ignore[union-attr]
    assert pids == ["4242", "4242"]

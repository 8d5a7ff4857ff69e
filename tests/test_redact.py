"""The trace's redactor, fed what the relay hands it for hostile streams (no sockets)."""

from __future__ import annotations

from imapproxy.redact import REDACTED, ClientRedactor, names_secret

SECRET = b"S3cret-pw"


def test_a_well_formed_login_keeps_its_tag_and_name() -> None:
    redactor = ClientRedactor()
    assert redactor.command_line(b"a LOGIN u {9}\r\n", b"a", b"LOGIN") == b"a LOGIN <redacted>\r\n"
    assert redactor.literal(SECRET) == REDACTED
    assert redactor.continuation_line(b"\r\n") == REDACTED + b"\r\n"
    assert redactor.saw_secret
    assert redactor.command_line(b"b NOOP\r\n", b"b", b"NOOP") == b"b NOOP\r\n"


def test_a_login_the_relay_could_not_parse_is_still_secret() -> None:
    for line in (b"x+ LOGIN u " + SECRET, b"y  LOGIN u " + SECRET, b"z\tlogin u " + SECRET):
        redactor = ClientRedactor()
        assert redactor.command_line(line + b"\r\n", None, None) == REDACTED + b"\r\n"
        assert redactor.saw_secret  # the server's echo is not traced either
    redactor = ClientRedactor()
    redactor.command_line(b"x+ LOGIN u {9+}\r\n", None, None)
    assert redactor.literal(SECRET) == REDACTED


def test_sasl_lines_sent_before_the_go_ahead_are_secret() -> None:
    """``w AUTHENTICATE PLAIN`` and its response in one write: the relay reads the response as
    a command line it cannot parse."""
    redactor = ClientRedactor()
    redactor.command_line(b"w AUTHENTICATE PLAIN\r\n", b"w", b"AUTHENTICATE")
    assert redactor.command_line(b"AHUAUzNjcmV0LXB3\r\n", None, None) == REDACTED + b"\r\n"
    assert redactor.command_line(b"b NOOP\r\n", b"b", b"NOOP") == b"b NOOP\r\n"


def test_a_refused_literal_read_as_a_command_is_secret() -> None:
    redactor = ClientRedactor()
    redactor.command_line(b"r LOGIN u {9}\r\n", b"r", b"LOGIN")
    assert redactor.command_line(SECRET + b"\r\n", None, None) == REDACTED + b"\r\n"


def test_a_command_taken_for_an_answer_to_a_continuation_is_secret() -> None:
    redactor = ClientRedactor()
    redactor.command_line(b"i IDLE\r\n", b"i", b"IDLE")
    assert redactor.response_line(b"DONE\r\n") == b"DONE\r\n"
    assert redactor.response_line(b"b LOGIN u " + SECRET + b"\r\n") == REDACTED + b"\r\n"
    assert redactor.saw_secret


def test_names_secret_looks_at_the_first_three_words_only() -> None:
    assert names_secret(b"a authenticate plain")
    assert not names_secret(b"a SEARCH SUBJECT x LOGIN")
    assert not names_secret(b"")

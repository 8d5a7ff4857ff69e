"""Property tests on hostile input for the protocol layer (fast profile in ``make test``,
``make fuzz`` runs the deep one): only our own errors, never a crash, and the data plane's
scanner always agreeing with the control plane's full reader."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from imapproxy.errors import ProxyError
from imapproxy.protocol.framing import (
    NEED_DATA,
    CommandFramer,
    Line,
    LiteralData,
)
from imapproxy.protocol.response import Response, ResponseReader
from imapproxy.session import (
    AdminRequested,
    Closed,
    LoginRequested,
    PreLoginPolicy,
    PreLoginSession,
    Reply,
    StartTLSRequested,
)
from tests.support.feed import framer_events, scan_stream, split

ATOMS = st.sampled_from([b"a", b"A1", b"x.y", b"tag]", b"*", b"+", b"", b"\xff", b"{3}", b"NIL"])
COMMANDS = st.sampled_from(
    [
        b"CAPABILITY",
        b"NOOP",
        b"LOGOUT",
        b"ID",
        b"LOGIN",
        b"AUTHENTICATE",
        b"STARTTLS",
        b"XPROXY_TRACE",
        b"SELECT",
        b"login",
        b"",
    ]
)
ARGS = st.one_of(
    st.binary(max_size=12).filter(lambda b: b"\n" not in b),
    st.binary(max_size=8).map(lambda b: b'"' + b.replace(b'"', b"") + b'"'),
    st.binary(max_size=20).map(lambda b: b"{%d}\r\n" % len(b) + b),
    st.binary(max_size=20).map(lambda b: b"{%d+}\r\n" % len(b) + b),
    st.sampled_from([b"(", b")", b"NIL", b'("name" "x")', b"PLAIN", b"=", b"*"]),
)
COMMAND_LINES = st.builds(
    lambda tag, name, args: tag + b" " + name + b"".join(b" " + a for a in args) + b"\r\n",
    ATOMS,
    COMMANDS,
    st.lists(ARGS, max_size=4),
)
STREAMS = st.lists(st.one_of(COMMAND_LINES, st.binary(max_size=30)), max_size=12).map(b"".join)


@given(STREAMS, st.integers(min_value=1, max_value=17), st.booleans(), st.booleans())
def test_prelogin_session_answers_anything(data: bytes, step: int, admin: bool, tls: bool) -> None:
    session = PreLoginSession(
        PreLoginPolicy(
            capabilities=lambda: b"* CAPABILITY IMAP4rev1",
            admin_enabled=lambda: admin,
            starttls_offered=lambda: tls,
            login_allowed=lambda: not tls,
        )
    )
    closed = False
    for i in range(0, len(data), step):
        session.receive_data(data[i : i + step])
        while (action := session.next_action()) is not NEED_DATA:
            assert not closed, "output after the connection was closed"
            allowed = (Reply, LoginRequested, AdminRequested, StartTLSRequested, Closed)
            assert isinstance(action, allowed)
            if isinstance(action, Reply):
                assert action.data.endswith(b"\r\n")
                closed = action.close
            if isinstance(action, StartTLSRequested):
                session.tls_started()


@given(STREAMS, st.integers(min_value=1, max_value=17))
def test_framer_gives_back_every_byte(data: bytes, step: int) -> None:
    framer = CommandFramer(4096)
    out = bytearray()
    try:
        for chunk in split(data, step):
            framer.receive_data(chunk)
            for event in framer_events(framer):
                if isinstance(event, Line | LiteralData):
                    out += event.data
    except ProxyError:
        return
    assert data.startswith(bytes(out))  # in order, nothing invented, nothing duplicated


RESPONSES = st.lists(
    st.one_of(
        st.sampled_from(
            [
                b"* 3 EXISTS\r\n",
                b"+ go\r\n",
                b"* FLAGS (\\Seen)\r\n",
                b"* OK [ALERT] x\r\n",
                b"* OK [PERMANENTFLAGS (\\*)] p\r\n",
            ]
        ),
        st.builds(
            lambda tag, word: tag + b" " + word + b" done\r\n",
            st.sampled_from([b"a1", b"B.2", b"t]"]),
            st.sampled_from([b"OK", b"NO", b"BAD"]),
        ),
        st.binary(max_size=60).map(lambda b: b"* 1 FETCH (BODY[] {%d}\r\n" % len(b) + b + b")\r\n"),
        st.binary(max_size=30).map(
            lambda b: b"* 2 FETCH (BINARY[] ~{%d}\r\n" % len(b) + b + b")\r\n"
        ),
    ),
    max_size=25,
)


@given(RESPONSES, st.integers(min_value=1, max_value=64))
def test_scanner_agrees_with_the_full_reader(responses: list[bytes], step: int) -> None:
    data = b"".join(responses)
    reader = ResponseReader()
    if data:
        reader.receive_data(data)  # b"" would mean EOF
    expected = []
    while (response := reader.next_response()) is not NEED_DATA:
        assert isinstance(response, Response)
        if response.tag == b"+":
            expected.append((b"+", b""))
        elif response.tag != b"*":
            expected.append((response.tag, response.word))
    events, scanner = scan_stream(split(data, step))
    assert [event for event in events if event[0] != b"*"] == expected
    assert (scanner.at_boundary or not data) and not scanner.broken

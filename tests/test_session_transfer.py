"""The hand-over's wire format, without sockets: whole, cut at every byte, with trailing data,
and hostile input (only ``TransferError`` comes out)."""

from __future__ import annotations

import contextlib
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imapproxy.backend_login import LoginResult
from imapproxy.route import Route, TLSMode
from imapproxy.select_cache import MailboxState, SelectEntry
from imapproxy.session_transfer import (
    FORMAT_VERSION,
    MAGIC,
    MAX_MESSAGE_BYTES,
    HasherKey,
    Hello,
    Kind,
    Listener,
    ListenerRole,
    Listeners,
    Marker,
    Message,
    Phase,
    ReceiveOrder,
    Refused,
    SessionRecord,
    TransferError,
    VersionMismatch,
    decode,
    encode,
)

LOGIN = LoginResult(
    b"Dovecot ready.",
    (b"IMAP4rev1", b"LITERAL+", b"ID"),
    b"OK [CAPABILITY IMAP4rev1 UNSELECT] Logged in",
    (b"* CAPABILITY IMAP4rev1 UNSELECT\r\n",),
    (b"IMAP4rev1", b"UNSELECT"),
)
ENTRY = SelectEntry(
    b"INBOX",
    b"* FLAGS (\\Seen)\r\n* 3 EXISTS\r\n* 0 RECENT\r\n",
    b"OK [READ-WRITE] Select completed",
    MailboxState(3, 4, 1700000000, None),
)
FULL = SessionRecord(
    username=b"alice@example.org",
    digest=bytes(range(32)),
    route=Route("imap.example.org", 993, TLSMode.IMPLICIT, b"alice", 7),
    login=LOGIN,
    select_entry=ENTRY,
    selected=True,
    closed_line=b"* OK [CLOSED] Previous mailbox closed.\r\n",
    remaining_ms=299_500,
    origin_ip="192.0.2.7",
    server="imap.example.org:993",
    backend_host="::1",
    backend_port=993,
)
BARE = SessionRecord(
    username=b"\xff\x00odd",
    digest=b"",
    route=None,
    login=LoginResult(b"", (), b"OK", (), ()),
    select_entry=None,
    selected=False,
    closed_line=None,
    remaining_ms=0,
    origin_ip=None,
    server="",
    backend_host="127.0.0.1",
    backend_port=143,
)
MESSAGES: list[Message] = [
    Hello(FORMAT_VERSION, 4242),
    Refused("another hand-over is under way"),
    Listeners(
        (
            Listener(ListenerRole.IMAP, socket.AF_INET6, "::", 143),
            Listener(ListenerRole.IMAP_TLS, socket.AF_INET, "127.0.0.1", 993),
            Listener(ListenerRole.METRICS, socket.AF_INET, "127.0.0.1", 9117),
        )
    ),
    Listeners(()),
    HasherKey(b"k" * 32),
    FULL,
    BARE,
    Marker(Kind.SENT, 3),
    Marker(Kind.READY, 4243),
    Marker(Kind.END, 5),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_each_message_whole(message: Message) -> None:
    data = encode(message)
    assert data.startswith(MAGIC)
    assert decode(data) == message


def test_hello_layout_is_fixed() -> None:
    """The part every version keeps: magic, kind, version; then this version's pid."""
    assert encode(Hello(1, 0x01020304)) == b"IPXH\x01\x00\x01\x01\x02\x03\x04\x00\x01"
    assert decode(encode(Hello(1, 7, processes=3))) == Hello(1, 7, 3)
    for bad in (0, 1025):
        with pytest.raises(TransferError, match="processes"):
            decode(b"IPXH\x01\x00\x01\x00\x00\x00\x07" + bad.to_bytes(2, "big"))


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_cut_short_message_is_an_error(message: Message) -> None:
    data = encode(message)
    for end in range(len(data)):
        with pytest.raises(TransferError):
            decode(data[:end])


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_trailing_data_is_an_error(message: Message) -> None:
    with pytest.raises(TransferError, match="1 bytes after the message"):
        decode(encode(message) + b"\x00")


@pytest.mark.parametrize("rest", [b"", b"\x00\x00\x00\x01", b"anything at all, laid out otherwise"])
def test_another_version_is_recognised_whatever_follows(rest: bytes) -> None:
    with pytest.raises(VersionMismatch) as caught:
        decode(MAGIC + bytes([Kind.HELLO]) + (999).to_bytes(2, "big") + rest)
    assert caught.value.version == 999
    assert "version 999; this program speaks 1" in str(caught.value)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"HTTP/1.1 200 OK\r\n", "not a hand-over message"),
        (MAGIC + b"\x09", "unknown message kind 9"),
        (MAGIC + b"\x03\x00\x00\x00\x01\x07", "cut short"),
        (MAGIC + b"\x03\x00\x00\x00\x01\x07\x00\x02\x00\x00\x00\x00\x00\x01", "listener role 7"),
        (MAGIC + b"\x02\x00\x00\x00\x02\xc3\x28", "not UTF-8"),
        (MAGIC + b"\x05\x00\x00\x00\x00\x00\x00\x00\x00\x02", "flag byte 2"),
        (b"\x00" * (MAX_MESSAGE_BYTES + 1), "over"),
    ],
)
def test_malformed_messages(data: bytes, reason: str) -> None:
    with pytest.raises(TransferError, match=reason):
        decode(data)


def test_huge_counts_do_not_allocate() -> None:
    """A count of 4 billion in a short message is cut short, not a 4-billion-item loop."""
    for kind in (Kind.LISTENERS, Kind.SESSION):
        body = b"\xff\xff\xff\xff" * 3 if kind is Kind.LISTENERS else b"\x00" * 9 + b"\xff" * 8
        with pytest.raises(TransferError):
            decode(MAGIC + bytes([kind]) + body)


def test_a_session_over_the_limit_is_not_encoded() -> None:
    huge = SessionRecord(**{**FULL.__dict__, "username": b"u" * MAX_MESSAGE_BYTES})
    with pytest.raises(ValueError, match="over"):
        encode(huge)


def test_out_of_range_fields_are_not_encoded() -> None:
    with pytest.raises(ValueError, match="cannot encode"):
        encode(Hello(70000, 1))


def test_a_session_carries_no_password() -> None:
    assert not {"password", "credentials"} & set(SessionRecord.__dataclass_fields__)


@given(st.binary(max_size=300))
def test_garbage_yields_only_our_error(data: bytes) -> None:
    with contextlib.suppress(TransferError):
        decode(data)


@given(st.sampled_from(list(Kind)), st.binary(max_size=300))
def test_garbage_after_a_valid_head_yields_only_our_error(kind: Kind, body: bytes) -> None:
    with contextlib.suppress(TransferError):
        decode(MAGIC + bytes([kind]) + body)


@given(st.integers(0, len(encode(FULL)) - 1), st.integers(0, 255))
def test_a_changed_byte_yields_a_message_or_our_error(position: int, value: int) -> None:
    data = bytearray(encode(FULL))
    data[position] = value
    try:
        message = decode(bytes(data))
    except TransferError:
        return
    assert isinstance(message, SessionRecord | Hello | Refused | Listeners | HasherKey | Marker)


# -- the conversation's order -------------------------------------------------------------------


def conversation() -> list[Message]:
    return [
        Hello(FORMAT_VERSION, 1),
        MESSAGES[2],
        HasherKey(b"k"),
        FULL,
        BARE,
        Marker(Kind.SENT, 2),
        FULL,
        Marker(Kind.END, 3),
    ]


def test_the_order_of_a_whole_conversation() -> None:
    order = ReceiveOrder()
    phases = [order.receive(message) for message in conversation()]
    assert phases == [
        Phase.LISTENERS,
        Phase.KEY,
        Phase.CACHED,
        Phase.CACHED,
        Phase.CACHED,
        Phase.LATE,
        Phase.LATE,
        Phase.DONE,
    ]
    assert order.sessions == 3


@pytest.mark.parametrize("skipped", range(len(conversation()) - 1))
def test_a_message_left_out_breaks_the_order(skipped: int) -> None:
    messages = conversation()
    del messages[skipped]
    order = ReceiveOrder()
    with pytest.raises(TransferError):
        for message in messages:
            order.receive(message)
        assert order.phase is Phase.DONE  # reached only if nothing complained


def test_a_refusal_ends_the_conversation_with_its_reason() -> None:
    with pytest.raises(TransferError, match="refused: busy"):
        ReceiveOrder().receive(Refused("busy"))


def test_markers_count_the_sessions() -> None:
    order = ReceiveOrder()
    for message in conversation()[:4]:
        order.receive(message)
    with pytest.raises(TransferError, match="SENT says 2 sessions, 1 came"):
        order.receive(Marker(Kind.SENT, 2))


def test_nothing_after_the_end() -> None:
    order = ReceiveOrder()
    for message in conversation():
        order.receive(message)
    with pytest.raises(TransferError, match="while done"):
        order.receive(FULL)


_blobs = st.binary(max_size=40)
_texts = st.text(max_size=20)
_optional_u64 = st.none() | st.integers(0, 2**64 - 1)
_routes = st.none() | st.builds(
    Route,
    _texts,
    st.integers(1, 65535),
    st.none() | st.sampled_from(list(TLSMode)),
    st.none() | _blobs,
    st.none() | st.integers(1, 2**32 - 1),
)
_logins = st.builds(
    LoginResult,
    _blobs,
    st.lists(_blobs, max_size=4).map(tuple),
    _blobs,
    st.lists(_blobs, max_size=3).map(tuple),
    st.lists(_blobs, max_size=4).map(tuple),
)
_entries = st.none() | st.builds(
    SelectEntry,
    _blobs,
    _blobs,
    _blobs,
    st.builds(MailboxState, st.integers(0, 2**64 - 1), _optional_u64, _optional_u64, _optional_u64),
)
_records = st.builds(
    SessionRecord,
    username=_blobs,
    digest=_blobs,
    route=_routes,
    login=_logins,
    select_entry=_entries,
    selected=st.booleans(),
    closed_line=st.none() | _blobs,
    remaining_ms=st.integers(0, 2**32 - 1),
    origin_ip=st.none() | _texts,
    server=_texts,
    backend_host=_texts,
    backend_port=st.integers(0, 65535),
)


@given(_records)
def test_any_session_record_comes_back_as_it_went(record: SessionRecord) -> None:
    assert decode(encode(record)) == record

"""The workers' messages (``worker_message``) and the choice of owner (``affinity``): no sockets."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imapproxy import affinity, worker_message
from imapproxy.credentials import Credentials
from imapproxy.worker_message import AdminCall, HandedClient, MessageError, Stopping

CLIENT = HandedClient(
    tag=b"a1",
    credentials=Credentials(b"user\xff", b's3cret \x00"', "PLAIN"),
    client_id=(b"name", b"Roundcube", b"x-originating-ip", None),
    unread=b"a2 SELECT INBOX\r\na3 FETCH 1 (FLAGS)\r\n",
    address=("192.0.2.7", 50123),
    connected_to=("127.0.0.1", 143),
    session_id="abcdEF0000002a",
    tls=True,
)


def test_a_handed_client_comes_back_whole() -> None:
    assert worker_message.decode(worker_message.encode(CLIENT)) == CLIENT


def test_an_admin_call_comes_back_whole() -> None:
    for call in (AdminCall(b"XPROXY_TRACE", b"someone"), AdminCall(b"XPROXY_DUMPICC", None)):
        assert worker_message.decode(worker_message.encode(call)) == call


def test_a_stopping_note_and_its_answer_come_back_whole() -> None:
    for note in (Stopping(1, 30.0), Stopping(0, seen=True)):
        assert worker_message.decode(worker_message.encode(note)) == note


@pytest.mark.parametrize(
    "fields",
    [
        '"worker": true, "lasts_s": 1, "seen": false',
        '"worker": -1, "lasts_s": 1, "seen": false',
        '"worker": 1, "lasts_s": -5, "seen": false',
        '"worker": 1, "lasts_s": 1, "seen": 0',
        '"worker": "1", "lasts_s": 1, "seen": false',
    ],
)
def test_a_stopping_note_of_the_wrong_shape_is_refused(fields: str) -> None:
    with pytest.raises(MessageError):
        worker_message.decode(b'IPXM\x01{"kind": "stopping", ' + fields.encode() + b"}")


def test_the_password_is_in_no_repr() -> None:
    assert b"s3cret" not in repr(CLIENT).encode()
    assert "s3cret" not in repr(CLIENT)


def test_another_version_is_refused_with_its_number() -> None:
    data = bytearray(worker_message.encode(CLIENT))
    data[4] = 9
    with pytest.raises(MessageError, match="version 9"):
        worker_message.decode(bytes(data))


def test_trailing_or_missing_bytes_are_refused() -> None:
    data = worker_message.encode(CLIENT)
    for bad in (data + b"x", data[:-1], data[:5], b"", b"IPXM"):
        with pytest.raises(MessageError):
            worker_message.decode(bad)


def test_an_oversized_message_is_refused_before_it_is_sent() -> None:
    big = HandedClient(**{**CLIENT.__dict__, "unread": b"x" * worker_message.MAX_MESSAGE_BYTES})
    with pytest.raises(MessageError, match="over"):
        worker_message.encode(big)


@given(st.binary(max_size=300))
def test_garbage_yields_only_our_error(data: bytes) -> None:
    for candidate in (data, b"IPXM\x01" + data):
        with contextlib.suppress(MessageError):  # anything else escaping fails the test
            worker_message.decode(candidate)


@given(
    st.dictionaries(
        st.sampled_from(
            [
                "kind",
                "tag",
                "username",
                "password",
                "address",
                "client_id",
                "unread",
                "tls",
                "name",
                "argument",
            ]
        ),
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(),
            st.text(max_size=8),
            st.lists(st.integers(), max_size=3),
        ),
    )
)
def test_json_of_the_wrong_shape_yields_only_our_error(body: dict[str, object]) -> None:
    import json

    data = b"IPXM\x01" + json.dumps(body).encode()
    with contextlib.suppress(MessageError):
        worker_message.decode(data)


def test_the_owner_is_stable_and_in_range() -> None:
    # the same in every process and run: a fixed value pins the hash
    assert affinity.owner(b"alice", 4) == affinity.owner(b"alice", 4)
    assert affinity.owner(b"alice", 1) == 0
    seen = {affinity.owner(f"user{i:04d}".encode(), 4) for i in range(200)}
    assert seen == {0, 1, 2, 3}
    assert (
        affinity.owner(b"alice", 7)
        == int.from_bytes(__import__("hashlib").blake2b(b"alice", digest_size=8).digest(), "big")
        % 7
    )


@given(st.integers(1, 100_000), st.integers(1, 64))
def test_shares_add_up_to_the_total(total: int, workers: int) -> None:
    parts = [affinity.share(total, workers, i) for i in range(workers)]
    assert min(parts) >= 1
    if total >= workers:
        assert sum(parts) == total
        assert max(parts) - min(parts) <= 1

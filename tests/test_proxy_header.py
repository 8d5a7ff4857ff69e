"""The PROXY protocol header parser, without sockets: whole, byte by byte, with trailing data,
truncated, oversize, garbage, and hypothesis on hostile input."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imapproxy.protocol.framing import NEED_DATA
from imapproxy.protocol.proxy_header import (
    MAX_HEADER_BYTES,
    V1_MAX_BYTES,
    V2_MAX_BYTES,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    parse,
)


def v2(command: int, family: int, block: bytes) -> bytes:
    """A v2 header as HAProxy's ``send-proxy-v2`` writes it."""
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(block)) + block


def v2_inet(client: tuple[str, int], server: tuple[str, int], tlvs: bytes = b"") -> bytes:
    src, dst = ipaddress.ip_address(client[0]), ipaddress.ip_address(server[0])
    family = 0x11 if src.version == 4 else 0x21
    block = src.packed + dst.packed + struct.pack("!HH", client[1], server[1]) + tlvs
    return v2(0x1, family, block)


V1_TCP4 = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 143\r\n"
V1_TCP6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 56324 993\r\n"
V1_UNKNOWN = b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"
V2_TCP4 = v2_inet(("192.0.2.7", 56324), ("198.51.100.1", 143))
V2_TCP6 = v2_inet(("2001:db8::7", 56324), ("2001:db8::1", 993), tlvs=b"\x03\x00\x04abcd")
V2_LOCAL = v2(0x0, 0x00, b"")
V2_LOCAL_WITH_BLOCK = v2(0x0, 0x11, bytes(12))  # LOCAL: whatever the block says is ignored

CASES = [
    (V1_TCP4, ProxyHeader(1, len(V1_TCP4), ("192.0.2.7", 56324), ("198.51.100.1", 143))),
    (V1_TCP6, ProxyHeader(1, len(V1_TCP6), ("2001:db8::7", 56324), ("2001:db8::1", 993))),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(1, 15, None, None)),
    (V1_UNKNOWN, ProxyHeader(1, len(V1_UNKNOWN), None, None)),
    (V2_TCP4, ProxyHeader(2, 28, ("192.0.2.7", 56324), ("198.51.100.1", 143))),
    (V2_TCP6, ProxyHeader(2, 16 + 36 + 7, ("2001:db8::7", 56324), ("2001:db8::1", 993))),
    (V2_LOCAL, ProxyHeader(2, 16, None, None)),
    (V2_LOCAL_WITH_BLOCK, ProxyHeader(2, 28, None, None)),
    (v2(0x1, 0x00, b""), ProxyHeader(2, 16, None, None)),  # UNSPEC: the real addresses
    (v2(0x1, 0x31, bytes(216)), ProxyHeader(2, 232, None, None)),  # UNIX: likewise
]
IDS = ["v1-tcp4", "v1-tcp6", "v1-unknown", "v1-unknown-rest", "v2-tcp4", "v2-tcp6-tlv"]
IDS += ["v2-local", "v2-local-block", "v2-unspec", "v2-unix"]


@pytest.mark.parametrize(("data", "expected"), CASES, ids=IDS)
def test_whole(data: bytes, expected: ProxyHeader) -> None:
    assert parse(data) == expected


@pytest.mark.parametrize(("data", "expected"), CASES, ids=IDS)
def test_byte_by_byte_every_prefix_needs_data(data: bytes, expected: ProxyHeader) -> None:
    for end in range(len(data)):
        assert parse(data[:end]) is NEED_DATA, data[:end]
    assert parse(data) == expected


@pytest.mark.parametrize(("data", "expected"), CASES, ids=IDS)
def test_trailing_data_is_not_the_headers(data: bytes, expected: ProxyHeader) -> None:
    # after the header: an IMAP command, or the ClientHello on the implicit-TLS port
    for trailing in (b"a LOGIN x y\r\n", b"\x16\x03\x01\x02\x00\x01", b"\r\n", V2_SIGNATURE):
        assert parse(data + trailing) == expected


@pytest.mark.parametrize(("data", "expected"), CASES, ids=IDS)
def test_truncated_at_eof(data: bytes, expected: ProxyHeader) -> None:
    for end in (0, 1, len(data) // 2, len(data) - 1):
        with pytest.raises(ProxyHeaderError, match="connection closed in the PROXY header"):
            parse(data[:end], eof=True)
    assert parse(data, eof=True) == expected


def test_v1_longest_line_is_accepted_one_more_byte_is_not() -> None:
    line = b"PROXY UNKNOWN " + b"x" * (V1_MAX_BYTES - 16) + b"\r\n"
    assert len(line) == V1_MAX_BYTES
    assert parse(line) == ProxyHeader(1, V1_MAX_BYTES, None, None)
    with pytest.raises(ProxyHeaderError, match="longer than 107 bytes"):
        parse(line[:-2] + b"x\r\n")


def test_v1_oversize_is_refused_without_waiting_for_the_end() -> None:
    with pytest.raises(ProxyHeaderError, match="longer than 107 bytes"):
        parse(b"PROXY UNKNOWN " + b"x" * 200)


def test_v2_oversize_is_refused_on_its_length_field_alone() -> None:
    fixed = V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", V2_MAX_BYTES - 16 + 1)
    with pytest.raises(ProxyHeaderError, match="more than 1040"):
        parse(fixed)
    largest = v2(0x1, 0x11, bytes(V2_MAX_BYTES - 16))
    assert parse(largest) == ProxyHeader(2, V2_MAX_BYTES, ("0.0.0.0", 0), ("0.0.0.0", 0))
    assert MAX_HEADER_BYTES >= V2_MAX_BYTES


GARBAGE = [
    (b"a LOGIN user pass\r\n", "no PROXY protocol header"),  # a client that is not HAProxy
    (b"\x16\x03\x01", "no PROXY protocol header"),  # a TLS ClientHello
    (b"proxy TCP4 ", "no PROXY protocol header"),  # the keyword is case-sensitive
    (b"PROXY TCP5 1.2.3.4 1.2.3.5 1 2\r\n", "expected TCP4, TCP6 or UNKNOWN"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.5 1\r\n", "expected TCP4, TCP6 or UNKNOWN"),
    (b"PROXY TCP4  1.2.3.4 1.2.3.5 1 2\r\n", "expected TCP4, TCP6 or UNKNOWN"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.5 1 2 3\r\n", "expected TCP4, TCP6 or UNKNOWN"),
    (b"PROXY TCP4 1.2.3.256 1.2.3.5 1 2\r\n", "bad address"),
    (b"PROXY TCP4 ::1 1.2.3.5 1 2\r\n", "address of the wrong family"),
    (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "address of the wrong family"),
    (b"PROXY TCP4 1.2.3.\xff 1.2.3.5 1 2\r\n", "bad address"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.5 65536 2\r\n", "bad port"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.5 -1 2\r\n", "bad port"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.5 1 \r\n", "bad port"),
    (b"PROXY TCP4 1.2.3.4\n", "stray CR or LF"),
    (b"PROXY TCP4 1.2.3.4\rx", "stray CR or LF"),
    (b"\r\n\r\n\x00\r\nQUIX", "no PROXY protocol header"),
    (b"\r\nfoo", "no PROXY protocol header"),
    (V2_SIGNATURE + b"\x11", "unknown version"),  # v1 in a v2 block
    (V2_SIGNATURE + b"\x22", "unknown command"),
    (V2_SIGNATURE + b"\x21\x41", "unknown address family"),
    (V2_SIGNATURE + b"\x21\x13", "unknown address family"),
    (V2_SIGNATURE + b"\x21\x12", "datagram transport"),
    (V2_SIGNATURE + b"\x21\x22", "datagram transport"),
    (v2(0x1, 0x11, bytes(11)), "address block too short"),
    (v2(0x1, 0x21, bytes(35)), "address block too short"),
    (v2(0x1, 0x31, bytes(215)), "address block too short"),
]


@pytest.mark.parametrize(("data", "message"), GARBAGE, ids=range(len(GARBAGE)))
def test_garbage_is_refused_at_the_first_byte_that_tells(data: bytes, message: str) -> None:
    with pytest.raises(ProxyHeaderError, match=message):
        parse(data)


@given(st.binary(max_size=MAX_HEADER_BYTES + 50))
def test_hostile_input_gives_a_header_need_data_or_our_error(data: bytes) -> None:
    try:
        result = parse(data)
    except ProxyHeaderError:
        return
    assert result is NEED_DATA or (
        isinstance(result, ProxyHeader) and 0 < result.length <= min(len(data), MAX_HEADER_BYTES)
    )


@given(st.binary(max_size=300))
def test_hostile_input_after_a_valid_start(tail: bytes) -> None:
    for start in (b"PROXY ", b"PROXY TCP4 ", V2_SIGNATURE, V2_SIGNATURE + b"\x21\x11"):
        try:
            result = parse(start + tail)
        except ProxyHeaderError:
            continue
        assert result is NEED_DATA or isinstance(result, ProxyHeader)


ADDRESSES = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6))
PORTS = st.integers(0, 65535)


@given(ADDRESSES, PORTS, PORTS, st.data())
def test_round_trip_of_what_a_sender_writes(
    client: ipaddress.IPv4Address | ipaddress.IPv6Address,
    client_port: int,
    server_port: int,
    data: st.DataObject,
) -> None:
    server = data.draw(st.ip_addresses(v=client.version))
    tlvs = data.draw(st.binary(max_size=64))
    proto = b"TCP4" if client.version == 4 else b"TCP6"
    line = b"PROXY %s %s %s %d %d\r\n" % (
        proto,
        str(client).encode(),
        str(server).encode(),
        client_port,
        server_port,
    )
    binary = v2_inet((str(client), client_port), (str(server), server_port), tlvs)
    for header in (line, binary):
        for step in (1, 7):
            for end in range(0, len(header), step):
                assert parse(header[:end]) is NEED_DATA
        result = parse(header + b"* trailing")
        assert isinstance(result, ProxyHeader) and result.length == len(header)
        assert result.client == (str(client), client_port)
        assert result.server == (str(server), server_port)

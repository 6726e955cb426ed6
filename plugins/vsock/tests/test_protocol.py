"""The 44-byte header: layout, round trip, hostile input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost_vsock.protocol import (
    HEADER_SIZE,
    Header,
    Op,
    ProtocolError,
    decode_header_untrusted,
    encode_header,
)


def test_layout_is_packed_little_endian() -> None:
    h = Header(src_cid=2, dst_cid=3, src_port=0x11223344, dst_port=5, op=Op.RW, len=6, type=1,
               flags=2, buf_alloc=65536, fwd_cnt=7)
    raw = encode_header(h)
    assert len(raw) == HEADER_SIZE == 44
    assert raw[:8] == (2).to_bytes(8, "little") and raw[8:16] == (3).to_bytes(8, "little")
    assert raw[16:20] == bytes.fromhex("44332211") and raw[24:28] == (6).to_bytes(4, "little")
    assert raw[28:30] == b"\x01\x00" and raw[30:32] == b"\x05\x00"
    assert raw[32:36] == (2).to_bytes(4, "little") and raw[36:40] == (65536).to_bytes(4, "little")
    assert decode_header_untrusted(raw) == h


def test_short_input_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="44 bytes"):
        decode_header_untrusted(b"\0" * 43)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=80))
def test_decode_arbitrary_bytes(data: bytes) -> None:
    try:
        h = decode_header_untrusted(data)
    except ProtocolError:
        assert len(data) < HEADER_SIZE
        return
    assert encode_header(h) == data[:HEADER_SIZE]
    assert isinstance(h.op, Op) == (h.op <= 7)

"""The CONNECT/OK line protocol and the host path names (upstream hybrid_vsock tests and more)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost_vsock.hybrid import (
    CONNECT_LINE_MAX,
    TEMPLATE_GUID,
    ConnectLineError,
    ConnectRequest,
    decode_connect_untrusted,
    encode_ok,
    guid_for_port,
    host_listener_path,
    listener_candidates,
)


def test_port_forms() -> None:
    assert decode_connect_untrusted(b"CONNECT 1234\n") == ConnectRequest(1234)
    assert decode_connect_untrusted(b"connect 1234\n") == ConnectRequest(1234)
    assert decode_connect_untrusted(b"CoNnEcT +7\n") == ConnectRequest(7)
    assert decode_connect_untrusted(b"CONNECT 4294967295\n") == ConnectRequest(0xFFFFFFFF)
    assert guid_for_port(1234) == "000004d2-facb-11e6-bd58-64006a7986d3"


def test_guid_forms() -> None:
    req = decode_connect_untrusted(b"CONNECT 00000123-facb-11e6-bd58-64006a7986d3\n")
    assert req == ConnectRequest(0x123, "00000123-facb-11e6-bd58-64006a7986d3")
    upper = decode_connect_untrusted(b"CONNECT 00000123-FACB-11e6-BD58-64006A7986D3\n")
    assert upper == req
    # The braced form is a valid GUID, but the line is 47 bytes: over the 45-byte limit.
    with pytest.raises(ConnectLineError, match="47 bytes"):
        decode_connect_untrusted(b"CONNECT {00000123-facb-11e6-bd58-64006a7986d3}\n")
    other = decode_connect_untrusted(b"CONNECT EE59B4BF-1111-2222-3333-444455556666\n")
    assert other == ConnectRequest(None, "ee59b4bf-1111-2222-3333-444455556666")


def test_ok_replies() -> None:
    assert encode_ok(1234, ConnectRequest(5)) == b"OK 1234\n"
    assert encode_ok(0x123, ConnectRequest(5, guid_for_port(5))) == (
        b"OK 00000123-facb-11e6-bd58-64006a7986d3\n"
    )


@pytest.mark.parametrize("line", [
    b"CONNECT 1234", b"CONNECT 1234\r\n", b"CONNECT  1234\n", b"CONNECT -1\n", b"CONNECT\n",
    b"CONNECT 4294967296\n", b"CONNECT 12ab\n", b"OPEN 1\n", b"CONNECT \n",
    b"CONNECT 0000012-3facb-11e6-bd58-64006a7986d3\n", b"CONNECT " + b"1" * 37 + b"\n",
    b"CONNECT \xff\n",
])
def test_malformed_lines(line: bytes) -> None:
    with pytest.raises(ConnectLineError):
        decode_connect_untrusted(line)


def test_length_limit_is_the_guid_line() -> None:
    line = f"CONNECT {TEMPLATE_GUID}\n".encode()
    assert len(line) == CONNECT_LINE_MAX == 45
    assert decode_connect_untrusted(line).port == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_lines_parse_or_fail_precisely(line: bytes) -> None:
    try:
        req = decode_connect_untrusted(line)
    except ConnectLineError:
        return
    assert line.endswith(b"\n") and len(line) <= 45 and line[:8].lower() == b"connect "
    assert req.port is None or 0 <= req.port <= 0xFFFFFFFF


def test_listener_paths(tmp_path: object) -> None:
    base = f"{tmp_path}/vm.sock"
    assert listener_candidates(base, 5000) == (
        f"{base}_5000", f"{base}_00001388-facb-11e6-bd58-64006a7986d3"
    )
    with pytest.raises(FileNotFoundError, match="no hybrid vsock listener"):
        host_listener_path(base, 5000)
    guid_path = listener_candidates(base, 5000)[1]
    open(guid_path, "w").close()
    assert host_listener_path(base, 5000) == guid_path
    open(f"{base}_5000", "w").close()
    assert host_listener_path(base, 5000) == f"{base}_5000"

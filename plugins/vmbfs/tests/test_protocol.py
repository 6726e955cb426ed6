"""The vmbfs wire format: layouts, constants, path rules (§8.5), codecs and their fuzzing."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost_vmbfs.protocol import (
    IMC_INSTANCE_ID,
    INTERFACE_ID,
    MAX_MESSAGE_SIZE,
    MAX_READ_SIZE,
    VERSION_WIN10,
    GetFileInfoRequest,
    GetFileInfoResponse,
    MessageType,
    PathCache,
    ProtocolError,
    ProtocolErrorKind,
    ReadFileRdmaRequest,
    ReadFileRdmaResponse,
    ReadFileRequest,
    ReadFileResponse,
    VersionRequest,
    VersionResponse,
    decode_message_untrusted,
    decode_path_untrusted,
    decode_read_file_request_fields_untrusted,
    decode_read_file_success_untrusted,
    decode_request_untrusted,
    decode_response_untrusted,
    encode_get_file_info_request,
    encode_get_file_info_response,
    encode_path,
    encode_read_file_rdma_request,
    encode_read_file_rdma_response,
    encode_read_file_request,
    encode_read_file_request_wire,
    encode_read_file_response,
    encode_version_request,
    encode_version_response,
)


def test_constants() -> None:
    assert MAX_MESSAGE_SIZE == 12288
    assert MAX_READ_SIZE == 12276
    assert VERSION_WIN10 == 0x00010000
    assert str(INTERFACE_ID) == "c376c1c3-d276-48d2-90a9-c04748072c60"
    assert str(IMC_INSTANCE_ID) == "c4e5e7d1-d748-4afc-979d-683167910a55"
    assert [int(t) for t in MessageType] == list(range(9))


def test_encoded_layouts() -> None:
    assert encode_version_request() == bytes.fromhex("01000000 00000000 00000100")
    assert encode_version_response(1) == bytes.fromhex("02000000 00000000 01000000")
    assert encode_get_file_info_request("/a") == bytes.fromhex("03000000 00000000 2f006100")
    assert encode_get_file_info_response(0, 1, 0x0102030405060708) == bytes.fromhex(
        "04000000 00000000 00000000 01000000 0807060504030201"
    )
    # The packed 12-byte fixed part: byte_count u32 @8, offset u64 @12 (unaligned), path @20.
    request = encode_read_file_request(0x11223344, 0x0102030405060708, "x")
    assert request == bytes.fromhex("05000000 00000000 44332211 0807060504030201 7800")
    assert len(request) == 22
    assert encode_read_file_response(0, b"hi") == bytes.fromhex("06000000 00000000 00000000 6869")
    assert encode_read_file_rdma_request(1, 2, 3, 4, "") == struct.pack("<IIIIQQ", 7, 0, 1, 2, 3, 4)
    assert encode_read_file_rdma_response(2, 9) == struct.pack("<IIII", 8, 0, 2, 9)


def test_requests_round_trip() -> None:
    assert decode_request_untrusted(encode_version_request(7)) == VersionRequest(7)
    assert decode_request_untrusted(encode_get_file_info_request("/d\\f")) == GetFileInfoRequest(
        "/d/f"
    )
    assert decode_request_untrusted(encode_read_file_request(5, 1 << 40, "/f")) == (
        ReadFileRequest(5, 1 << 40, "/f")
    )


def test_reserved_header_word_is_ignored_and_trailing_version_bytes_too() -> None:
    message = struct.pack("<III", 1, 0xFFFFFFFF, VERSION_WIN10) + b"junk"
    assert decode_request_untrusted(message) == VersionRequest(VERSION_WIN10)


def test_responses_round_trip() -> None:
    assert decode_response_untrusted(encode_version_response(0)) == VersionResponse(0)
    assert decode_response_untrusted(encode_get_file_info_response(0, 1, 9)) == (
        GetFileInfoResponse(0, 1, 9)
    )
    assert decode_response_untrusted(encode_read_file_response(0, b"abc")) == ReadFileResponse(
        0, b"abc"
    )
    assert decode_response_untrusted(encode_read_file_response(2)) == ReadFileResponse(2)


def test_every_message_type_decodes_with_the_generic_decoder() -> None:
    cases = [
        (encode_version_request(3), VersionRequest(3)),
        (encode_version_response(1), VersionResponse(1)),
        (encode_get_file_info_request("\\x"), GetFileInfoRequest("/x")),
        (encode_get_file_info_response(1, 2, 3), GetFileInfoResponse(1, 2, 3)),
        (encode_read_file_request(1, 2, "/y"), ReadFileRequest(1, 2, "/y")),
        (encode_read_file_response(0, b"z"), ReadFileResponse(0, b"z")),
        (encode_read_file_rdma_request(1, 2, 3, 4, "/r"), ReadFileRdmaRequest(1, 2, 3, 4, "/r")),
        (encode_read_file_rdma_response(2, 9), ReadFileRdmaResponse(2, 9)),
    ]
    for wire, value in cases:
        assert decode_message_untrusted(wire) == value
    with pytest.raises(ProtocolError) as info:
        decode_message_untrusted(struct.pack("<II", 0, 0))
    assert info.value.kind is ProtocolErrorKind.INVALID_MESSAGE_TYPE
    with pytest.raises(ProtocolError) as info:
        decode_message_untrusted(struct.pack("<II", 7, 0) + bytes(23))
    assert info.value.kind is ProtocolErrorKind.TOO_SHORT


def test_rdma_request_is_not_a_request_even_when_truncated() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_request_untrusted(struct.pack("<II", 7, 0))
    assert info.value.kind is ProtocolErrorKind.INVALID_MESSAGE_TYPE


def test_data_after_a_failure_status_is_rejected_by_the_client_decoder() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_response_untrusted(struct.pack("<III", 6, 0, 3) + b"x")
    assert info.value.kind is ProtocolErrorKind.DATA_WITHOUT_SUCCESS


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        (b"", ProtocolErrorKind.TOO_SHORT),
        (b"\x01\x00\x00\x00\x00\x00\x00", ProtocolErrorKind.TOO_SHORT),
        (struct.pack("<II", 1, 0) + b"\x00\x00\x01", ProtocolErrorKind.TOO_SHORT),
        (struct.pack("<II", 5, 0) + bytes(11), ProtocolErrorKind.TOO_SHORT),
        (struct.pack("<II", 0, 0), ProtocolErrorKind.INVALID_MESSAGE_TYPE),
        (encode_version_response(0), ProtocolErrorKind.INVALID_MESSAGE_TYPE),
        (encode_read_file_rdma_request(1, 2, 3, 4, "/f"), ProtocolErrorKind.INVALID_MESSAGE_TYPE),
        (struct.pack("<II", 9, 0), ProtocolErrorKind.INVALID_MESSAGE_TYPE),
        (struct.pack("<II", 0xFFFFFFFF, 0), ProtocolErrorKind.INVALID_MESSAGE_TYPE),
    ],
)
def test_bad_requests(message: bytes, kind: ProtocolErrorKind) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_request_untrusted(message)
    assert info.value.kind is kind


# -- §8.5 path rules, one test each -------------------------------------------------------------


def test_path_rule_1_odd_length_is_unaligned() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_path_untrusted(b"/\x00a")
    assert info.value.kind is ProtocolErrorKind.UNALIGNED


@pytest.mark.parametrize("raw", [b"/\x00a\x00\x00\x00", b"\x00\x00", b"a\x00\x00\x00b\x00"])
def test_path_rule_2_any_nul_unit_even_a_terminator(raw: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_path_untrusted(raw)
    assert info.value.kind is ProtocolErrorKind.NULL_TERMINATOR_IN_PATH


def test_path_rule_2_zero_bytes_straddling_units_are_not_nul() -> None:
    # Units 0x0100 and 0x0001: the zero bytes at offsets 1-2 are not one aligned unit.
    assert decode_path_untrusted(b"\x00\x01\x01\x00") == "\u0100\u0001"


def test_path_rule_2_is_checked_before_rule_3() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_path_untrusted(b"\x00\xd8\x00\x00")  # lone high surrogate, then NUL
    assert info.value.kind is ProtocolErrorKind.NULL_TERMINATOR_IN_PATH


@pytest.mark.parametrize("raw", [b"\x00\xd8", b"\x00\xdc", b"\x00\xdca\x00", b"a\x00\x00\xd8"])
def test_path_rule_3_unpaired_surrogates_are_invalid(raw: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_path_untrusted(raw)
    assert info.value.kind is ProtocolErrorKind.INVALID_UTF16_PATH


def test_path_rule_3_surrogate_pairs_are_valid() -> None:
    assert decode_path_untrusted("/\U0001f600".encode("utf-16-le")) == "/\U0001f600"


def test_path_rule_4_backslashes_become_slashes() -> None:
    assert decode_path_untrusted("\\a\\b/c".encode("utf-16-le")) == "/a/b/c"


def test_path_rule_4_empty_path_is_valid() -> None:
    assert decode_path_untrusted(b"") == ""


def test_encode_path_refuses_what_the_device_would_reject() -> None:
    assert encode_path("/x") == b"/\x00x\x00"
    with pytest.raises(ValueError):
        encode_path("a\0")
    with pytest.raises(ValueError):
        encode_path("\ud800")


def test_path_cache_decodes_as_the_function_and_bad_paths_always_fail() -> None:
    cache = PathCache()
    good = "\\a\\b".encode("utf-16-le")
    for _ in range(2):
        assert cache.decode_untrusted(good) == "/a/b"
        assert cache.decode_untrusted(memoryview(good)) == "/a/b"
        with pytest.raises(ProtocolError) as info:
            cache.decode_untrusted(good + b"\x00\x00")
        assert info.value.kind is ProtocolErrorKind.NULL_TERMINATOR_IN_PATH
        with pytest.raises(ProtocolError) as info:
            cache.decode_untrusted(good[:-1])
        assert info.value.kind is ProtocolErrorKind.UNALIGNED


def test_path_cache_sees_the_bytes_as_they_are_now() -> None:
    cache = PathCache()
    raw = bytearray("/a".encode("utf-16-le"))
    assert cache.decode_untrusted(raw) == "/a"
    raw[2] = ord("b")  # the peer rewrites the path in place
    assert cache.decode_untrusted(raw) == "/b"
    raw[2] = 0
    with pytest.raises(ProtocolError) as info:
        cache.decode_untrusted(raw)
    assert info.value.kind is ProtocolErrorKind.NULL_TERMINATOR_IN_PATH


def test_path_cache_is_right_for_many_distinct_and_long_paths() -> None:
    """The cache is bounded: ever new paths evict old ones, and none is answered wrongly."""
    cache = PathCache(size=8, max_bytes=16)
    for _ in range(2):
        for i in range(50):
            assert cache.decode_untrusted(f"/f{i}".encode("utf-16-le")) == f"/f{i}"
        long = "\\" + "x" * 600
        assert cache.decode_untrusted(long.encode("utf-16-le")) == "/" + "x" * 600
        with pytest.raises(ProtocolError) as info:
            cache.decode_untrusted(long.encode("utf-16-le") + b"\x00\xdc")
        assert info.value.kind is ProtocolErrorKind.INVALID_UTF16_PATH
    assert cache.decode_untrusted(b"") == ""


def test_read_file_request_fields() -> None:
    message = encode_read_file_request(MAX_READ_SIZE, 2**40 + 3, "\\dir\\imc.hiv")
    assert decode_read_file_request_fields_untrusted(message) == (
        MAX_READ_SIZE, 2**40 + 3, "/dir/imc.hiv"
    )
    assert decode_read_file_request_fields_untrusted(memoryview(message), PathCache()) == (
        MAX_READ_SIZE, 2**40 + 3, "/dir/imc.hiv"
    )
    # Not a READ_FILE_REQUEST with its whole fixed part: left to the full decoder.
    assert decode_read_file_request_fields_untrusted(message[:19]) is None
    assert decode_read_file_request_fields_untrusted(encode_get_file_info_request("/a" * 8)) is None
    with pytest.raises(ProtocolError) as info:
        decode_read_file_request_fields_untrusted(message + b"\x00")
    assert info.value.kind is ProtocolErrorKind.UNALIGNED


def test_read_file_request_wire_is_the_same_bytes() -> None:
    assert encode_read_file_request_wire(7, 9, encode_path("/x")) == (
        encode_read_file_request(7, 9, "/x")
    )
    assert encode_read_file_request_wire(7, 9, b"") == bytes.fromhex(
        "05000000 00000000 07000000 0900000000000000"
    )


def test_read_file_success_data() -> None:
    reply = encode_read_file_response(0, b"data")
    view = decode_read_file_success_untrusted(reply)
    assert view is not None and bytes(view) == b"data"
    empty = decode_read_file_success_untrusted(encode_read_file_response(0))
    assert empty is not None and bytes(empty) == b""
    assert decode_read_file_success_untrusted(encode_read_file_response(2)) is None
    assert decode_read_file_success_untrusted(encode_read_file_response(2) + b"x") is None
    assert decode_read_file_success_untrusted(encode_version_response(0)) is None
    assert decode_read_file_success_untrusted(reply[:11]) is None


# -- fuzzing ----------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_decode_as_a_request_or_raise_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_request_untrusted(data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([1, 3, 5]), st.binary(max_size=48))
def test_any_body_of_a_request_type_decodes_or_raises_protocol_error(
    message_type: int, body: bytes
) -> None:
    with contextlib.suppress(ProtocolError):
        decode_request_untrusted(struct.pack("<II", message_type, 0) + body)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 9), st.binary(max_size=48))
def test_any_message_decodes_or_raises_protocol_error(message_type: int, body: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_message_untrusted(struct.pack("<II", message_type, 0) + body)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_decode_as_a_response_or_raise_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_response_untrusted(data)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**64 - 1),
    st.text(st.characters(exclude_characters="\0\\", exclude_categories=["Cs"]), max_size=40),
)
def test_read_file_request_round_trips(count: int, offset: int, path: str) -> None:
    assert decode_request_untrusted(encode_read_file_request(count, offset, path)) == (
        ReadFileRequest(count, offset, path)
    )


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.binary(max_size=48),
    st.builds(lambda body: struct.pack("<II", 5, 0) + body, st.binary(max_size=48)),
))
def test_read_file_fields_agree_with_the_full_decoder(data: bytes) -> None:
    try:
        expected: object = decode_request_untrusted(data)
    except ProtocolError as exc:
        expected = exc.kind
    try:
        fields = decode_read_file_request_fields_untrusted(data)
    except ProtocolError as exc:
        assert expected is exc.kind
        return
    if fields is None:
        assert not isinstance(expected, ReadFileRequest)
    else:
        assert expected == ReadFileRequest(*fields)


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.binary(max_size=40),
    st.builds(
        lambda status, body: struct.pack("<III", 6, 0, status) + body,
        st.integers(0, 4),
        st.binary(max_size=24),
    ),
))
def test_read_file_success_data_agrees_with_the_full_decoder(data: bytes) -> None:
    try:
        expected: object = decode_response_untrusted(data)
    except ProtocolError:
        expected = None
    view = decode_read_file_success_untrusted(data)
    if view is None:
        assert not (isinstance(expected, ReadFileResponse) and expected.status == 0)
    else:
        assert expected == ReadFileResponse(0, bytes(view))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=12), max_size=6))
def test_path_cache_agrees_with_the_function(raws: list[bytes]) -> None:
    cache = PathCache(size=3)
    for raw in raws + raws:
        try:
            expected: object = decode_path_untrusted(raw)
        except ProtocolError as exc:
            expected = exc.kind
        try:
            got: object = cache.decode_untrusted(raw)
        except ProtocolError as exc:
            got = exc.kind
        assert got == expected

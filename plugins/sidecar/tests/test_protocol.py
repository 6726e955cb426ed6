"""Layouts of facts §11.3-11.5: sizes, offsets, encodings, and decoders fed hostile bytes."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost_sidecar import hvdef as hv
from devicehost_sidecar import protocol as p
from devicehost_sidecar.errors import SidecarProtocolError

FUZZ = settings(max_examples=250, deadline=None)


def test_page_sizes_and_offsets_match_the_facts() -> None:
    assert p.COMMAND_PAGE_SIZE == p.CONTROL_PAGE_SIZE == p.PAGE_SIZE == 4096
    assert (p.CPU_CONTEXT_OFFSET, p.INTERCEPT_MESSAGE_OFFSET, p.ERROR_OFFSET) == (16, 1040, 1296)
    assert (p.REQUEST_DATA_OFFSET, p.RESERVED_OFFSET) == (1552, 2576)
    assert p.CONTROL_CPU_STATUS_OFFSET == 64 and p.MAX_CPUS_PER_NODE == 4032
    assert p.MAX_GET_SET_VP_REGISTERS == 31 == (1024 - 16) // 32
    assert p.CPU_CONTEXT.size == 1024 and hv.HV_MESSAGE_SIZE == 256
    assert p.TRANSLATE_GVA_RESPONSE.size == 80 and p.TRANSLATE_GVA_REQUEST.size == 16


def test_command_numbers_and_cpu_statuses() -> None:
    assert [int(c) for c in p.SidecarCommand] == [0, 1, 2, 3, 4]
    translate_gva: int = p.SidecarCommand.TRANSLATE_GVA  # an int enum: compares with ints
    assert translate_gva == 4
    assert [(s.name, int(s)) for s in p.CpuStatus] == [
        ("REMOVED", 0),
        ("IDLE", 1),
        ("RUN", 2),
        ("STOP", 3),
        ("REMOVE", 4),
    ]


def test_command_page_fields_land_at_their_offsets() -> None:
    buf = bytearray(4096)
    page = p.CommandPage(memoryview(buf))
    page.command = p.SidecarCommand.SET_VP_REGISTERS
    page.has_error = True
    page.cpu_context[0] = 0xC1
    page.intercept_message[0] = 0xA1
    page.error[0] = 0xE1
    page.request_data[0] = 0xD1
    assert buf[0:4] == b"\x03\0\0\0" and buf[4] == 1
    assert (buf[16], buf[1040], buf[1296], buf[1552]) == (0xC1, 0xA1, 0xE1, 0xD1)
    assert page.has_error and page.command == 3
    page.release()
    with pytest.raises(ValueError):
        p.CommandPage(memoryview(bytearray(4095)))


def test_get_set_request_bytes() -> None:
    data = p.encode_get_set_request(
        p.GetSetVpRegisterRequest(2, target_vtl=0x12),
        [p.RegisterAssoc(0x20000, 0x1122), p.RegisterAssoc(0x20010, 1 << 127)],
    )
    assert len(data) == 16 + 2 * 32
    assert data[:16] == b"\x02\x00\x12\x00" + bytes(12)
    assert data[16:32] == b"\x00\x00\x02\x00" + bytes(12)
    assert data[32:48] == b"\x22\x11" + bytes(14)
    assert data[48:52] == b"\x10\x00\x02\x00" and data[64:80] == bytes(15) + b"\x80"
    with pytest.raises(ValueError):
        p.encode_get_set_request(p.GetSetVpRegisterRequest(32), [p.RegisterAssoc(1)] * 32)


def test_get_set_response_reads_status_and_values() -> None:
    area = bytearray(1024)
    struct.pack_into("<H", area, 4, 0x5)
    area[16 + 16 : 16 + 32] = (7).to_bytes(16, "little")
    area[48 + 16 : 48 + 32] = (1 << 100).to_bytes(16, "little")
    assert p.decode_get_set_response_untrusted(bytes(area), 2) == (5, [7, 1 << 100])


def test_translate_gva_layouts() -> None:
    assert p.encode_translate_gva_request(p.TranslateGvaRequest(0x1234, 0b101)) == (
        (0x1234).to_bytes(8, "little") + (5).to_bytes(8, "little")
    )
    response = p.TranslateGvaResponse(0, 2, cache_type=6, overlay_page=True, gpa_page=0xABC)
    data = p.encode_translate_gva_response(response)
    assert len(data) == 80
    assert struct.unpack_from("<Q", data, 16)[0] == 2 | 6 << 32 | 1 << 40
    assert struct.unpack_from("<Q", data, 64)[0] == 0xABC
    assert p.decode_translate_gva_response_untrusted(data) == response


def test_hv_message_round_trip_and_oversized_payload() -> None:
    message = hv.HvMessage(hv.HV_MESSAGE_TYPE_X64_IO_PORT_INTERCEPT, b"xyz", True, 9)
    data = hv.encode_hv_message(message)
    assert data[:16] == b"\x00\x00\x01\x80\x03\x01\x00\x00" + (9).to_bytes(8, "little")
    assert hv.decode_hv_message_untrusted(data) == message
    bad = bytearray(data)
    bad[4] = 241
    with pytest.raises(SidecarProtocolError, match="241-byte payload"):
        hv.decode_hv_message_untrusted(bytes(bad))


def test_io_port_intercept_round_trip() -> None:
    msg = hv.IoPortIntercept(3, 0x1000, 0x2, 0x3F8, 1, True, 0x41)
    data = hv.encode_io_port_intercept(msg)
    assert len(data) == 128 and struct.unpack_from("<H", data, 40)[0] == 0x3F8
    assert struct.unpack_from("<Q", data, 48)[0] == 0x41
    assert hv.decode_io_port_intercept_untrusted(data) == msg
    with pytest.raises(SidecarProtocolError):
        hv.decode_io_port_intercept_untrusted(data[:127])


def test_command_error_is_cut_at_a_character_boundary() -> None:
    field = p.encode_command_error("é" * 200)  # 400 bytes of UTF-8
    assert len(field) == 256 and field[0] == 254
    assert p.decode_command_error_untrusted(field) == "é" * 127
    assert p.decode_command_error_untrusted(p.encode_command_error("boom")) == "boom"


def test_cpu_context_keeps_cr2_in_the_rsp_slot() -> None:
    gps = tuple(range(100, 116))
    data = p.encode_cpu_context(p.CpuContext(gps, b"\x11" * 512))
    assert struct.unpack_from("<Q", data, 8 * p.GPS_CR2_INDEX)[0] == 104
    assert data[128:640] == b"\x11" * 512 and data[640:] == bytes(384)
    assert p.decode_cpu_context_untrusted(data).gps == gps


def test_node_info_is_checked() -> None:
    good = p.encode_node_info(p.NodeInfo(4, 2, 8192))
    assert good == b"\x04\0\0\0\x02\0\0\0\x00\x20\0\0"
    assert p.decode_node_info_untrusted(good).cpus == range(4, 6)
    for info, match in [
        (p.NodeInfo(0, 0, 8192), "0 CPUs"),
        (p.NodeInfo(0, 4033, 8192), "4033 CPUs"),
        (p.NodeInfo(0, 2, 4096), "4096 bytes"),
        (p.NodeInfo(0, 2, 8193), "8193 bytes"),
        (p.NodeInfo(0xFFFFFFFF, 2, 8192), "overflows"),
    ]:
        with pytest.raises(SidecarProtocolError, match=match):
            p.decode_node_info_untrusted(p.encode_node_info(info))
    with pytest.raises(SidecarProtocolError, match="11 bytes"):
        p.decode_node_info_untrusted(good[:11])


def test_control_page_header_round_trip() -> None:
    header = p.ControlPageHeader(1, 2, 3, 4, 5, 6, 7)
    data = p.encode_control_page_header(header)
    assert len(data) == 64 and data[24:28] == b"\x07\0\0\0"
    assert p.decode_control_page_header_untrusted(data) == header


@FUZZ
@given(st.binary(min_size=0, max_size=300))
def test_fuzz_decoders_raise_only_protocol_errors(data: bytes) -> None:
    decoders = [
        p.decode_node_info_untrusted,
        hv.decode_hv_message_untrusted,
        p.decode_command_error_untrusted,
        p.decode_cpu_context_untrusted,
        p.decode_translate_gva_response_untrusted,
        p.decode_translate_gva_request_untrusted,
        p.decode_run_vp_response_untrusted,
        hv.decode_io_port_intercept_untrusted,
        p.decode_control_page_header_untrusted,
    ]
    for decode in decoders:
        with contextlib.suppress(SidecarProtocolError):
            decode(data)


@FUZZ
@given(st.binary(min_size=1024, max_size=1024), st.integers(0, 40))
def test_fuzz_register_areas(data: bytes, count: int) -> None:
    if count > p.MAX_GET_SET_VP_REGISTERS:
        with pytest.raises(SidecarProtocolError):
            p.decode_get_set_response_untrusted(data, count)
    else:
        status, values = p.decode_get_set_response_untrusted(data, count)
        assert status == int.from_bytes(data[4:6], "little")
        assert values == [
            int.from_bytes(data[32 + 32 * i : 48 + 32 * i], "little") for i in range(count)
        ]
    claimed = int.from_bytes(data[0:2], "little")
    if claimed > p.MAX_GET_SET_VP_REGISTERS:
        with pytest.raises(SidecarProtocolError, match=f"invalid register count: {claimed}"):
            p.decode_get_set_request_untrusted(data)
    else:
        request, assocs = p.decode_get_set_request_untrusted(data)
        assert request.count == len(assocs) == claimed

"""The protocol core: one test per row of the §8.6 state table, asserting the exact reply bytes,
or that there is no reply and a later valid request is not answered either."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost_vmbfs.backing import FileError, FileErrorKind, FileInfo
from devicehost_vmbfs.core import FatalError, FatalErrorKind, ProtocolState, VmbfsCore
from devicehost_vmbfs.directory import DirectoryBacking
from devicehost_vmbfs.protocol import (
    MAX_READ_SIZE,
    encode_get_file_info_request,
    encode_read_file_request,
    encode_version_request,
)
from devicehost_vmbfs.single_file import SingleFileBacking

CONTENT = bytes(range(256)) * 100  # 25600 bytes

VERSION_SUPPORTED = bytes.fromhex("02000000 00000000 00000000")
VERSION_UNSUPPORTED = bytes.fromhex("02000000 00000000 01000000")


@pytest.fixture
def backing(tmp_path: Path) -> Iterator[SingleFileBacking]:
    path = tmp_path / "hive"
    path.write_bytes(CONTENT)
    b = SingleFileBacking.open("imc.hiv", path)
    yield b
    b.close()


def ready(backing: SingleFileBacking) -> VmbfsCore:
    core = VmbfsCore(backing)
    assert core.handle(encode_version_request()) == VERSION_SUPPORTED
    return core


def assert_fatal(core: VmbfsCore, message: bytes, kind: FatalErrorKind) -> None:
    with pytest.raises(FatalError) as info:
        core.handle(message)
    assert info.value.kind is kind
    # Stopped: a later, perfectly valid request gets no answer either.
    with pytest.raises(FatalError) as again:
        core.handle(encode_get_file_info_request("/imc.hiv"))
    assert again.value is info.value


def _state(core: VmbfsCore) -> ProtocolState:
    """The core's state, read through a call: ``handle`` changes it, so a check before a
    ``handle`` must not narrow the checks after it."""
    return core.state


# -- VersionRequest state -------------------------------------------------------------------------


def test_version_request_win10_is_supported_and_moves_to_ready(backing: SingleFileBacking) -> None:
    core = VmbfsCore(backing)
    assert _state(core) is ProtocolState.VERSION_REQUEST
    assert core.handle(encode_version_request(0x00010000)) == VERSION_SUPPORTED
    assert core.state is ProtocolState.READY


@pytest.mark.parametrize("version", [0, 0x00010001, 0x00020000, 0xFFFFFFFF])
def test_version_request_other_is_unsupported_and_client_may_retry(
    backing: SingleFileBacking, version: int
) -> None:
    core = VmbfsCore(backing)
    assert core.handle(encode_version_request(version)) == VERSION_UNSUPPORTED
    assert core.state is ProtocolState.VERSION_REQUEST
    assert core.handle(encode_version_request()) == VERSION_SUPPORTED


def test_get_file_info_before_version_is_fatal(backing: SingleFileBacking) -> None:
    assert_fatal(
        VmbfsCore(backing),
        encode_get_file_info_request("/imc.hiv"),
        FatalErrorKind.UNEXPECTED_MESSAGE,
    )


def test_read_file_before_version_is_fatal(backing: SingleFileBacking) -> None:
    assert_fatal(
        VmbfsCore(backing),
        encode_read_file_request(MAX_READ_SIZE + 1, 0, "/imc.hiv"),
        FatalErrorKind.UNEXPECTED_MESSAGE,
    )


# -- Ready state ----------------------------------------------------------------------------------


def test_get_file_info_success(backing: SingleFileBacking) -> None:
    reply = ready(backing).handle(encode_get_file_info_request("/imc.hiv"))
    assert reply == struct.pack("<IIIIQ", 4, 0, 0, 0, len(CONTENT))


def test_get_file_info_backslash_path(backing: SingleFileBacking) -> None:
    reply = ready(backing).handle(encode_get_file_info_request("\\imc.hiv"))
    assert reply == struct.pack("<IIIIQ", 4, 0, 0, 0, len(CONTENT))


@pytest.mark.parametrize("path", ["imc.hiv", "/IMC.HIV", "/", "", "/imc.hiv/"])
def test_get_file_info_not_found_has_zero_flags_and_size(
    backing: SingleFileBacking, path: str
) -> None:
    reply = ready(backing).handle(encode_get_file_info_request(path))
    assert reply == struct.pack("<IIIIQ", 4, 0, 1, 0, 0)


class _Dir:
    """A backing whose only path is a directory (the flag travels as bit 0)."""

    def file_info(self, path: str) -> FileInfo:
        if path == "/d":
            return FileInfo(directory=True, file_size=0)
        raise FileError(FileErrorKind.ERROR, "broken")

    def read_file(self, path: str, offset: int, buf: bytearray | memoryview) -> None:
        raise FileError(FileErrorKind.ERROR, "broken")

    def describe(self) -> dict[str, object]:
        return {}


def test_get_file_info_directory_flag_and_error_status() -> None:
    core = VmbfsCore(_Dir(), ProtocolState.READY)
    assert core.handle(encode_get_file_info_request("/d")) == struct.pack("<IIIIQ", 4, 0, 0, 1, 0)
    assert core.handle(encode_get_file_info_request("/x")) == struct.pack("<IIIIQ", 4, 0, 3, 0, 0)
    assert core.handle(encode_read_file_request(4, 0, "/d")) == struct.pack("<III", 6, 0, 3)


def test_read_file_success_returns_exactly_byte_count(backing: SingleFileBacking) -> None:
    core = ready(backing)
    reply = core.handle(encode_read_file_request(100, 1000, "/imc.hiv"))
    assert reply == struct.pack("<III", 6, 0, 0) + CONTENT[1000:1100]


def test_read_file_max_size(backing: SingleFileBacking) -> None:
    reply = ready(backing).handle(encode_read_file_request(MAX_READ_SIZE, 1, "/imc.hiv"))
    assert reply == struct.pack("<III", 6, 0, 0) + CONTENT[1 : 1 + MAX_READ_SIZE]
    assert len(reply) == 12288


def test_read_file_zero_bytes_is_success_without_data(backing: SingleFileBacking) -> None:
    core = ready(backing)
    assert core.handle(encode_read_file_request(0, 0, "/imc.hiv")) == struct.pack("<III", 6, 0, 0)
    assert core.handle(encode_read_file_request(0, 10**9, "/imc.hiv")) == struct.pack(
        "<III", 6, 0, 0
    )


def test_read_file_to_exactly_the_end(backing: SingleFileBacking) -> None:
    reply = ready(backing).handle(encode_read_file_request(10, len(CONTENT) - 10, "/imc.hiv"))
    assert reply == struct.pack("<III", 6, 0, 0) + CONTENT[-10:]


def test_read_file_partly_past_eof_is_end_of_file_without_data(backing: SingleFileBacking) -> None:
    reply = ready(backing).handle(encode_read_file_request(11, len(CONTENT) - 10, "/imc.hiv"))
    assert reply == struct.pack("<III", 6, 0, 2)


def test_read_file_not_found(backing: SingleFileBacking) -> None:
    reply = ready(backing).handle(encode_read_file_request(4, 0, "/other"))
    assert reply == struct.pack("<III", 6, 0, 1)


def test_read_file_unseekable_offset_is_error(backing: SingleFileBacking) -> None:
    reply = ready(backing).handle(encode_read_file_request(4, 2**63, "/imc.hiv"))
    assert reply == struct.pack("<III", 6, 0, 3)


def test_read_file_too_large_is_fatal_without_reply(backing: SingleFileBacking) -> None:
    assert_fatal(
        ready(backing),
        encode_read_file_request(MAX_READ_SIZE + 1, 0, "/imc.hiv"),
        FatalErrorKind.READ_TOO_LARGE,
    )


def test_version_request_when_ready_is_fatal(backing: SingleFileBacking) -> None:
    assert_fatal(ready(backing), encode_version_request(), FatalErrorKind.UNEXPECTED_MESSAGE)


# -- any state ------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", list(ProtocolState))
@pytest.mark.parametrize("message_type", [0, 2, 4, 6, 7, 8, 9, 0x10000, 0xFFFFFFFF])
def test_other_message_types_are_fatal(
    backing: SingleFileBacking, state: ProtocolState, message_type: int
) -> None:
    message = struct.pack("<II", message_type, 0) + bytes(32)
    assert_fatal(VmbfsCore(backing, state), message, FatalErrorKind.INVALID_MESSAGE_TYPE)


@pytest.mark.parametrize("state", list(ProtocolState))
@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"\x01\x00\x00\x00",
        struct.pack("<II", 1, 0) + b"\x00\x00\x01",
        struct.pack("<II", 5, 0),
        struct.pack("<II", 5, 0) + bytes(11),
    ],
)
def test_short_messages_are_fatal(
    backing: SingleFileBacking, state: ProtocolState, message: bytes
) -> None:
    assert_fatal(VmbfsCore(backing, state), message, FatalErrorKind.TOO_SHORT)


def test_parsing_precedes_the_state_check(backing: SingleFileBacking) -> None:
    # A malformed READ_FILE before the version: TooShort, not UnexpectedMessage.
    assert_fatal(
        VmbfsCore(backing), struct.pack("<II", 5, 0) + bytes(4), FatalErrorKind.TOO_SHORT
    )
    # A bad path before the version: the path error, not UnexpectedMessage.
    assert_fatal(
        VmbfsCore(backing), struct.pack("<II", 3, 0) + b"a", FatalErrorKind.UNALIGNED
    )


@pytest.mark.parametrize("state", list(ProtocolState))
@pytest.mark.parametrize(
    ("path", "kind"),
    [
        (b"/\x00a", FatalErrorKind.UNALIGNED),
        (b"/\x00\x00\x00", FatalErrorKind.NULL_TERMINATOR_IN_PATH),
        (b"\x00\xd8", FatalErrorKind.INVALID_UTF16_PATH),
    ],
)
def test_bad_paths_are_fatal(
    backing: SingleFileBacking, state: ProtocolState, path: bytes, kind: FatalErrorKind
) -> None:
    assert_fatal(VmbfsCore(backing, state), struct.pack("<II", 3, 0) + path, kind)
    read = struct.pack("<IIIQ", 5, 0, 4, 0) + path
    assert_fatal(VmbfsCore(backing, state), read, kind)


def test_nul_terminated_path_of_a_real_file_is_fatal(backing: SingleFileBacking) -> None:
    message = encode_get_file_info_request("/imc.hiv") + b"\x00\x00"
    assert_fatal(ready(backing), message, FatalErrorKind.NULL_TERMINATOR_IN_PATH)


_MESSAGES = st.one_of(
    st.binary(max_size=40),
    st.builds(
        lambda t, body: struct.pack("<II", t, 0) + body,
        st.sampled_from([1, 3, 5]),
        st.binary(max_size=40),
    ),
    st.just(encode_version_request()),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_MESSAGES, max_size=5), st.sampled_from(list(ProtocolState)))
def test_any_messages_only_reply_or_raise_documented_fatal_errors(
    messages: list[bytes], state: ProtocolState
) -> None:
    core = VmbfsCore(_Dir(), state)
    for message in messages:
        try:
            reply = core.handle(message)
        except FatalError as exc:
            assert exc.kind is not FatalErrorKind.PIPE
            assert core.fatal is exc
            break
        assert core.fatal is None
        assert struct.unpack_from("<I", reply)[0] in (2, 4, 6)


@pytest.mark.parametrize(
    "path",
    ["\\..\\secret", "/../secret", "..\\secret", "\\sub\\..\\..\\secret", "\\link_out", "/abs"],
)
def test_directory_escapes_answer_not_found_on_the_wire(tmp_path: Path, path: str) -> None:
    (tmp_path / "secret").write_bytes(b"SECRET")
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    os.symlink("../secret", root / "link_out")
    os.symlink(str(tmp_path / "secret"), root / "abs")
    backing = DirectoryBacking.open(root)
    try:
        core = VmbfsCore(backing, ProtocolState.READY)
        not_found_info = struct.pack("<IIIIQ", 4, 0, 1, 0, 0)
        assert core.handle(encode_get_file_info_request(path)) == not_found_info
        assert core.handle(encode_read_file_request(6, 0, path)) == struct.pack("<III", 6, 0, 1)
    finally:
        backing.close()


def test_read_file_hot_path_checks_the_path_before_size_and_state(
    backing: SingleFileBacking,
) -> None:
    bad_path = struct.pack("<IIIQ", 5, 0, MAX_READ_SIZE + 1, 0) + b"/\x00\x00\x00"
    assert_fatal(VmbfsCore(backing), bad_path, FatalErrorKind.NULL_TERMINATOR_IN_PATH)
    assert_fatal(ready(backing), bad_path, FatalErrorKind.NULL_TERMINATOR_IN_PATH)


def test_reads_of_a_path_seen_before_are_answered_and_a_bad_variant_still_fails(
    backing: SingleFileBacking,
) -> None:
    core = ready(backing)
    for offset in (0, 100, 25000):
        reply = core.handle(encode_read_file_request(600, offset, "/imc.hiv"))
        assert bytes(reply) == bytes.fromhex("06000000 00000000 00000000") + (
            CONTENT[offset : offset + 600]
        )
    assert core.messages == 4
    assert_fatal(
        core,
        encode_read_file_request(600, 0, "/imc.hiv") + b"\x00\x00",
        FatalErrorKind.NULL_TERMINATOR_IN_PATH,
    )


# -- backing failures: an error status, and the channel goes on ---------------------------------


class FailingBacking:
    """A backing whose every call raises ``OSError(code)``, until ``healed``."""

    def __init__(self, code: int, inner: SingleFileBacking) -> None:
        self.code = code
        self.inner = inner
        self.healed = False

    def _fail(self) -> None:
        if not self.healed:
            raise OSError(self.code, os.strerror(self.code), "/imc.hiv")

    def file_info(self, path: str) -> FileInfo:
        self._fail()
        return self.inner.file_info(path)

    def read_file(self, path: str, offset: int, buf: bytearray | memoryview) -> None:
        self._fail()
        self.inner.read_file(path, offset, buf)

    def describe(self) -> dict[str, object]:
        return {"kind": "failing"}


@pytest.mark.parametrize(
    ("code", "status"),
    [(errno.EIO, 3), (errno.EACCES, 3), (errno.EMFILE, 3), (errno.ENFILE, 3),
     (errno.ENOENT, 1), (errno.ESTALE, 3)],
)
def test_os_errors_of_a_backing_answer_an_error_status_and_the_channel_goes_on(
    backing: SingleFileBacking, code: int, status: int
) -> None:
    failing = FailingBacking(code, backing)
    core = VmbfsCore(failing)
    assert core.handle(encode_version_request()) == VERSION_SUPPORTED
    assert core.handle(encode_get_file_info_request("/imc.hiv")) == struct.pack(
        "<IIIIQ", 4, 0, status, 0, 0
    )
    assert core.handle(encode_read_file_request(10, 0, "/imc.hiv")) == struct.pack(
        "<III", 6, 0, status
    )
    assert core.fatal is None
    assert core.backing_errors == (2 if status == 3 else 0)
    if status == 3:
        assert core.last_backing_error == f"[Errno {code}] {os.strerror(code)}: '/imc.hiv'"
    failing.healed = True
    assert core.handle(encode_read_file_request(4, 1, "/imc.hiv")) == (
        struct.pack("<III", 6, 0, 0) + CONTENT[1:5]
    )


def test_fatal_error_text_names_its_kind_once(backing: SingleFileBacking) -> None:
    with pytest.raises(FatalError) as info:
        VmbfsCore(backing).handle(b"\x01\x00\x00\x00")
    assert str(info.value) == "TooShort: message of 4 bytes has no 8-byte header"
    assert info.value.detail == "message of 4 bytes has no 8-byte header"
    with pytest.raises(FatalError) as info:
        ready(backing).handle(struct.pack("<II", 9, 0))
    assert str(info.value).startswith("InvalidMessageType: ")
    assert "InvalidMessageType" not in info.value.detail

"""The single-file (IMC hive) backing: name validation, exact lookup, whole reads only."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from devicehost.files import FileRefusedError
from devicehost_vmbfs.backing import FileError, FileErrorKind, FileInfo
from devicehost_vmbfs.single_file import InvalidFileName, SingleFileBacking

DATA = os.urandom(5000)


@pytest.fixture
def backing(tmp_path: Path) -> Iterator[SingleFileBacking]:
    (tmp_path / "hive").write_bytes(DATA)
    b = SingleFileBacking.open("imc.hiv", tmp_path / "hive")
    yield b
    b.close()


@pytest.mark.parametrize("name", ["a/b", "a\\b", "/imc.hiv", "\\"])
def test_names_with_separators_are_refused(tmp_path: Path, name: str) -> None:
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(InvalidFileName):
        SingleFileBacking.open(name, tmp_path / "f")


def test_only_regular_files_are_served(tmp_path: Path) -> None:
    with pytest.raises(FileRefusedError, match=r"not a regular file \(a directory\)"):
        SingleFileBacking.open("d", tmp_path)
    with pytest.raises(FileRefusedError, match=r"not a regular file \(a character device\)"):
        SingleFileBacking.open("d", "/dev/zero")


def test_a_fifo_is_refused_without_being_opened_for_reading(tmp_path: Path) -> None:
    fifo = tmp_path / "hive"
    os.mkfifo(fifo)
    errors: list[BaseException] = []

    def open_it() -> None:
        try:
            SingleFileBacking.open("imc.hiv", fifo)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=open_it, daemon=True)
    thread.start()
    thread.join(30)
    if thread.is_alive():  # blocked in open(): release it, and fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(30)
        pytest.fail("opening a FIFO as the vmbfs file blocked")
    (error,) = errors
    assert isinstance(error, FileRefusedError) and error.strerror == "not a regular file (a FIFO)"


def test_file_info(backing: SingleFileBacking) -> None:
    assert backing.file_info("/imc.hiv") == FileInfo(directory=False, file_size=5000)


@pytest.mark.parametrize(
    "path", ["imc.hiv", "/IMC.HIV", "/Imc.hiv", "/", "", "//imc.hiv", "/imc.hiv/"]
)
def test_lookup_is_exact_and_case_sensitive(backing: SingleFileBacking, path: str) -> None:
    with pytest.raises(FileError) as info:
        backing.file_info(path)
    assert info.value.kind is FileErrorKind.NOT_FOUND
    with pytest.raises(FileError) as info:
        backing.read_file(path, 0, bytearray(1))
    assert info.value.kind is FileErrorKind.NOT_FOUND


def test_size_follows_the_file(tmp_path: Path, backing: SingleFileBacking) -> None:
    with open(tmp_path / "hive", "ab") as f:
        f.write(b"more")
    assert backing.file_info("/imc.hiv").file_size == 5004


def test_read_fills_the_buffer(backing: SingleFileBacking) -> None:
    buf = bytearray(1000)
    backing.read_file("/imc.hiv", 4000, buf)
    assert buf == DATA[4000:]


def test_read_past_eof_even_partly_fails_with_end_of_file(backing: SingleFileBacking) -> None:
    buf = bytearray(1001)
    with pytest.raises(FileError) as info:
        backing.read_file("/imc.hiv", 4000, buf)
    assert info.value.kind is FileErrorKind.END_OF_FILE
    with pytest.raises(FileError) as info:
        backing.read_file("/imc.hiv", 10**12, bytearray(1))
    assert info.value.kind is FileErrorKind.END_OF_FILE


def test_empty_read_anywhere_seekable_succeeds(backing: SingleFileBacking) -> None:
    backing.read_file("/imc.hiv", 10**12, bytearray())
    with pytest.raises(FileError) as info:
        backing.read_file("/imc.hiv", 2**63, bytearray())
    assert info.value.kind is FileErrorKind.ERROR


def test_a_long_guest_path_is_echoed_shortened(backing: SingleFileBacking) -> None:
    with pytest.raises(FileError) as info:
        backing.file_info("/" + "a" * 6000)
    assert "(6001 characters, 5941 not shown)" in str(info.value)
    assert len(str(info.value)) < 200

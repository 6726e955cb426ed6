"""Paths an operator or a peer chose: only regular files are opened, nothing blocks on a FIFO."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from devicehost.files import FileRefusedError, open_regular_file, read_regular_file


def test_a_regular_file_and_a_symlink_to_one_are_read(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"contents")
    (tmp_path / "link").symlink_to(path)
    assert read_regular_file(path, 8) == b"contents"
    assert read_regular_file(tmp_path / "link", 100) == b"contents"
    fd = open_regular_file(path)
    try:
        assert os.get_blocking(fd) and os.get_inheritable(fd) is False
        assert os.read(fd, 100) == b"contents"
    finally:
        os.close(fd)


def test_a_fifo_is_refused_without_blocking(tmp_path: Path, call_bounded: Any) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    error = call_bounded(lambda: read_regular_file(fifo, 100), fifo)
    assert isinstance(error, FileRefusedError)
    assert error.strerror == "not a regular file (a FIFO)"
    assert error.filename == str(fifo)
    (tmp_path / "link").symlink_to(fifo)
    error = call_bounded(lambda: open_regular_file(tmp_path / "link"), fifo)
    assert isinstance(error, FileRefusedError)


@pytest.mark.parametrize(("make", "kind"), [
    (lambda p: p.mkdir(), "a directory"),
    (lambda p: socket.socket(socket.AF_UNIX).bind(str(p)), "a socket"),
])
def test_other_kinds_are_refused_by_name(tmp_path: Path, make: Any, kind: str) -> None:
    path = tmp_path / "x"
    make(path)
    with pytest.raises(FileRefusedError, match=f"not a regular file \\({kind}\\)"):
        read_regular_file(path, 100)


def test_a_character_device_is_refused() -> None:
    with pytest.raises(FileRefusedError, match=r"not a regular file \(a character device\)"):
        read_regular_file("/dev/zero", 100)


def test_a_fifo_swapped_in_after_the_check_is_refused_without_blocking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call_bounded: Any
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    regular = os.stat(__file__)
    real_stat = os.stat

    def stat_says_regular(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        return regular if Path(path) == fifo else real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat_says_regular)
    fds_before = set(os.listdir("/proc/self/fd"))
    error = call_bounded(lambda: open_regular_file(fifo), fifo)
    assert isinstance(error, FileRefusedError) and "a FIFO" in str(error)
    assert set(os.listdir("/proc/self/fd")) == fds_before  # the fd opened on it was closed


def test_sizes_over_the_limit_are_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "big"
    path.write_bytes(b"x" * 101)
    with pytest.raises(FileRefusedError, match=r"larger than 100 bytes \(101 bytes\)"):
        read_regular_file(path, 100)
    assert read_regular_file(path, 101) == b"x" * 101


def test_a_file_that_grows_while_read_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "growing"
    path.write_bytes(b"x" * 10)
    real_fstat = os.fstat
    calls: list[int] = []

    def fstat_before_growth(fd: int) -> os.stat_result:
        result = real_fstat(fd)
        calls.append(fd)
        if len(calls) == 2 and stat.S_ISREG(result.st_mode):
            path.write_bytes(b"x" * 1000)  # grows right after its size was read
        return result

    monkeypatch.setattr(os, "fstat", fstat_before_growth)
    with pytest.raises(FileRefusedError, match="it grew while read"):
        read_regular_file(path, 100)


def test_missing_files_raise_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_regular_file(tmp_path / "missing", 10)

"""The directory backing: serves its tree, and no path ever reaches outside the root."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devicehost_vmbfs.backing import FileError, FileErrorKind, FileInfo
from devicehost_vmbfs.directory import DirectoryBacking

SECRET = b"SECRET-OUTSIDE-THE-ROOT"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "secret").write_bytes(SECRET)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "f").write_bytes(SECRET)
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.txt").write_bytes(b"hello")
    (root / "sub").mkdir()
    (root / "sub" / "b.bin").write_bytes(bytes(range(256)))
    (root / "sub" / "deeper").mkdir()
    (root / "Ünï cödé ✓").write_bytes(b"unicode")
    # Symlinks inside the root that stay inside it.
    os.symlink("a.txt", root / "link_in")
    os.symlink("../a.txt", root / "sub" / "link_up")
    os.symlink("sub", root / "link_dir")
    # Symlinks that point out.
    os.symlink(str(tmp_path / "secret"), root / "abs_out")
    os.symlink("../secret", root / "rel_out")
    os.symlink("../../secret", root / "sub" / "rel_out2")
    os.symlink("..", root / "parent")
    os.symlink(str(tmp_path / "outside"), root / "abs_dir_out")
    os.symlink("loop", root / "loop")
    return root


@pytest.fixture
def backing(tree: Path) -> Iterator[DirectoryBacking]:
    b = DirectoryBacking.open(tree)
    yield b
    b.close()


def read_all(backing: DirectoryBacking, path: str) -> bytes:
    info = backing.file_info(path)
    buf = bytearray(info.file_size)
    backing.read_file(path, 0, buf)
    return bytes(buf)


def test_files_and_directories(backing: DirectoryBacking) -> None:
    assert backing.file_info("/a.txt") == FileInfo(False, 5)
    assert backing.file_info("a.txt") == FileInfo(False, 5)
    assert backing.file_info("/sub") == FileInfo(True, 0)
    assert backing.file_info("/") == FileInfo(True, 0)
    assert backing.file_info("") == FileInfo(True, 0)
    assert backing.file_info("//sub//./b.bin") == FileInfo(False, 256)
    assert read_all(backing, "/sub/b.bin") == bytes(range(256))
    assert read_all(backing, "/Ünï cödé ✓") == b"unicode"


def test_reads_are_whole_or_end_of_file(backing: DirectoryBacking) -> None:
    buf = bytearray(3)
    backing.read_file("/a.txt", 2, buf)
    assert buf == b"llo"
    with pytest.raises(FileError) as info:
        backing.read_file("/a.txt", 3, bytearray(3))
    assert info.value.kind is FileErrorKind.END_OF_FILE


def test_reading_a_directory_is_an_error(backing: DirectoryBacking) -> None:
    with pytest.raises(FileError) as info:
        backing.read_file("/sub", 0, bytearray(1))
    assert info.value.kind is FileErrorKind.ERROR


def test_missing_and_through_a_file_are_not_found(backing: DirectoryBacking) -> None:
    for path in ["/nope", "/sub/nope", "/a.txt/x", "/A.TXT"]:
        with pytest.raises(FileError) as info:
            backing.file_info(path)
        assert info.value.kind is FileErrorKind.NOT_FOUND, path


def test_symlinks_inside_the_root_are_followed(backing: DirectoryBacking) -> None:
    assert read_all(backing, "/link_in") == b"hello"
    assert read_all(backing, "/sub/link_up") == b"hello"
    assert read_all(backing, "/link_dir/b.bin") == bytes(range(256))
    assert backing.file_info("/link_dir") == FileInfo(True, 0)


def test_special_files_are_not_served(tree: Path, backing: DirectoryBacking) -> None:
    os.mkfifo(tree / "fifo")
    with pytest.raises(FileError) as info:
        backing.file_info("/fifo")
    assert info.value.kind is FileErrorKind.NOT_FOUND
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tree / "sock"))
        with pytest.raises(FileError) as info:
            backing.read_file("/sock", 0, bytearray(1))
        assert info.value.kind is FileErrorKind.NOT_FOUND
    finally:
        sock.close()


ESCAPES = [
    "..",
    "/..",
    "/../secret",
    "../secret",
    "/sub/../../secret",
    "/sub/../a.txt",  # even a climb that would stay inside is refused
    "/./../secret",
    "//..//secret",
    "/abs_out",
    "/rel_out",
    "/sub/rel_out2",
    "/parent/secret",
    "/parent",
    "/abs_dir_out/f",
    "/link_dir/../../secret",
    "/loop",
]


@pytest.mark.parametrize("path", ESCAPES)
def test_escape_attempts_answer_not_found_or_error(backing: DirectoryBacking, path: str) -> None:
    with pytest.raises(FileError) as info:
        backing.file_info(path)
    assert info.value.kind in (FileErrorKind.NOT_FOUND, FileErrorKind.ERROR)
    with pytest.raises(FileError) as info:
        backing.read_file(path, 0, bytearray(len(SECRET)))
    assert info.value.kind in (FileErrorKind.NOT_FOUND, FileErrorKind.ERROR)


def test_absolute_host_paths_resolve_inside_the_root(tree: Path, backing: DirectoryBacking) -> None:
    outside = str(tree.parent / "secret")
    with pytest.raises(FileError) as info:
        backing.file_info(outside)
    assert info.value.kind is FileErrorKind.NOT_FOUND
    # Rebuild the same absolute path inside the root: now it is served, from the root.
    inner = tree / outside.lstrip("/")
    inner.parent.mkdir(parents=True)
    inner.write_bytes(b"inner copy")
    assert read_all(backing, outside) == b"inner copy"


def test_swapped_directory_is_not_followed(tree: Path, backing: DirectoryBacking) -> None:
    # A directory replaced by a symlink to the outside is treated like any symlink out.
    os.rename(tree / "sub", tree / "sub.old")
    os.symlink(str(tree.parent / "outside"), tree / "sub")
    with pytest.raises(FileError) as info:
        backing.read_file("/sub/f", 0, bytearray(len(SECRET)))
    assert info.value.kind in (FileErrorKind.NOT_FOUND, FileErrorKind.ERROR)


_SEGMENTS = st.sampled_from(
    ["..", ".", "", "sub", "a.txt", "secret", "outside", "f", "parent", "rel_out", "abs_out",
     "link_dir", "abs_dir_out", "loop", "\u202e", "\ud7ff", "..\u200b",
     "\uff53\uff45\uff43\uff52\uff45\uff54"]
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(_SEGMENTS, max_size=6), st.booleans())
def test_no_path_ever_returns_bytes_from_outside(
    backing: DirectoryBacking, segments: list[str], leading: bool
) -> None:
    path = ("/" if leading else "") + "/".join(segments)
    try:
        data = read_all(backing, path)
    except FileError:
        return
    assert SECRET not in data


def test_lookups_leak_no_file_descriptors(backing: DirectoryBacking) -> None:
    before = len(os.listdir("/proc/self/fd"))
    for path in ["/a.txt", "/sub", "/sub/b.bin", "/link_dir/b.bin", "/nope", *ESCAPES]:
        for _ in range(3):
            with contextlib.suppress(FileError):
                read_all(backing, path)
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_long_refused_guest_path_is_echoed_shortened(backing: DirectoryBacking) -> None:
    with pytest.raises(FileError) as info:
        backing.file_info("../" + "a" * 6000)
    assert info.value.kind is FileErrorKind.NOT_FOUND
    assert "(6003 characters, 5943 not shown)" in str(info.value)
    assert len(str(info.value)) < 200


@contextlib.contextmanager
def no_descriptor_left() -> Iterator[list[int]]:
    """Fill this process's descriptor table (under a lowered soft limit, restored after)."""
    import errno
    import gc
    import resource

    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    gc.collect()  # garbage holding descriptors must not free one while the table is full
    gc.disable()
    try:
        highest = max(int(n) for n in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 8, limits[1]))
        while True:
            try:
                held.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
            except OSError as exc:
                assert exc.errno == errno.EMFILE
                break
        yield held
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
        gc.enable()


def test_no_descriptor_left_answers_error_and_the_device_goes_on(backing: DirectoryBacking) -> None:
    import struct

    from devicehost_vmbfs.core import VmbfsCore
    from devicehost_vmbfs.protocol import (
        encode_get_file_info_request,
        encode_read_file_request,
        encode_version_request,
    )

    core = VmbfsCore(backing)
    core.handle(encode_version_request())
    requests = [encode_get_file_info_request("/a.txt"),
                encode_read_file_request(5, 0, "/sub/b.bin")]
    with no_descriptor_left():  # (the os.dup of the root fd fails first: EMFILE)
        info, read = (bytes(core.handle(request)) for request in requests)
    assert info == struct.pack("<IIIIQ", 4, 0, 3, 0, 0)  # ERROR, as for any OS error
    assert read == struct.pack("<III", 6, 0, 3)
    assert core.fatal is None and core.backing_errors == 2
    assert "Too many open files" in str(core.last_backing_error)
    assert bytes(core.handle(encode_read_file_request(5, 0, "/a.txt"))) == (
        struct.pack("<III", 6, 0, 0) + b"hello"
    )


def test_a_file_removed_while_served_is_not_found(tree: Path, backing: DirectoryBacking) -> None:
    assert backing.file_info("/a.txt") == FileInfo(directory=False, file_size=5)
    (tree / "a.txt").unlink()
    with pytest.raises(FileError) as info:
        backing.read_file("/a.txt", 0, bytearray(5))
    assert info.value.kind is FileErrorKind.NOT_FOUND

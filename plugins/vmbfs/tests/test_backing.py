"""The one mapping from backing errors to wire status, and OS error classification."""

from __future__ import annotations

import errno
import os

import pytest

from devicehost_vmbfs.backing import FileError, FileErrorKind, file_error_from_os, status_for_error
from devicehost_vmbfs.protocol import Status


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        (FileErrorKind.NOT_FOUND, 1),
        (FileErrorKind.END_OF_FILE, 2),
        (FileErrorKind.ERROR, 3),
    ],
)
def test_status_for_error(kind: FileErrorKind, status: int) -> None:
    assert status_for_error(FileError(kind, "x")) == status
    assert isinstance(status_for_error(FileError(kind, "x")), Status)


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (errno.ENOENT, FileErrorKind.NOT_FOUND),
        (errno.ENOTDIR, FileErrorKind.NOT_FOUND),
        (errno.EACCES, FileErrorKind.ERROR),
        (errno.EIO, FileErrorKind.ERROR),
        (errno.ELOOP, FileErrorKind.ERROR),
    ],
)
def test_file_error_from_os(code: int, kind: FileErrorKind) -> None:
    error = file_error_from_os(OSError(code, "boom"), "/p")
    assert error.kind is kind
    assert "/p" in str(error)


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (errno.ENOENT, Status.NOT_FOUND),
        (errno.ENOTDIR, Status.NOT_FOUND),
        (errno.EMFILE, Status.ERROR),
        (errno.EIO, Status.ERROR),
        (errno.EACCES, Status.ERROR),
        (errno.ESTALE, Status.ERROR),
    ],
)
def test_an_os_error_a_backing_let_through_maps_to_a_status_too(code: int, status: Status) -> None:
    assert status_for_error(OSError(code, os.strerror(code))) is status


def test_error_text_names_the_kind_once() -> None:
    error = FileError(FileErrorKind.ERROR, "'/a': Input/output error")
    assert (str(error), error.detail) == ("error: '/a': Input/output error",
                                          "'/a': Input/output error")

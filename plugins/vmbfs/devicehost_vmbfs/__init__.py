"""devicehost-vmbfs: the VMBus file system device (read-only files over a VMBus message pipe).

A re-implementation of OpenVMM's vmbfs: it offers the IMC instance, negotiates the one protocol
version, and answers GET_FILE_INFO and READ_FILE from a single file or a directory tree.
"""

from __future__ import annotations

from devicehost_vmbfs.backing import Backing, FileError, FileErrorKind, FileInfo
from devicehost_vmbfs.client import VmbfsClient, VmbfsClientError
from devicehost_vmbfs.client_device import VmbfsClientConfig, VmbfsClientDevice
from devicehost_vmbfs.device import VmbfsConfig, VmbfsDevice, VmbfsSavedState
from devicehost_vmbfs.directory import DirectoryBacking
from devicehost_vmbfs.single_file import SingleFileBacking

__all__ = [
    "Backing",
    "DirectoryBacking",
    "FileError",
    "FileErrorKind",
    "FileInfo",
    "SingleFileBacking",
    "VmbfsClient",
    "VmbfsClientConfig",
    "VmbfsClientDevice",
    "VmbfsClientError",
    "VmbfsConfig",
    "VmbfsDevice",
    "VmbfsSavedState",
]

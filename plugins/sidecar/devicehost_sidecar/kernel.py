"""The kernel driver: the sidecar's ``/dev/mshv_vtl_sidecarN`` character devices (facts §11.2).

Each node is opened read-write and non-blocking; the info ioctl describes its CPUs; its shared
memory is mapped once (``cpu_count x per_cpu_shmem`` bytes, offset 0); start/stop/run are ioctls
whose integer argument is the absolute CPU number; the node fd itself is the completion fd.

Enumeration opens ``<prefix>0``, ``<prefix>1``, ... and stops at the first node that does not
exist; a missing node 0 means this machine has no sidecar (``None``). Every other failure is a
:class:`SidecarDriverError` naming the device path.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
from collections.abc import Callable
from typing import Final

from devicehost_sidecar.driver import SidecarNode
from devicehost_sidecar.errors import SidecarDriverError
from devicehost_sidecar.protocol import (
    MAX_NODES,
    NODE_INFO,
    NodeInfo,
    decode_node_info_untrusted,
)

__all__ = [
    "DEFAULT_DEVICE_PREFIX",
    "SIDECAR_INFO",
    "SIDECAR_RUN",
    "SIDECAR_START",
    "SIDECAR_STOP",
    "IoctlFunction",
    "KernelDriver",
    "KernelNode",
    "ioc",
]

DEFAULT_DEVICE_PREFIX: Final = "/dev/mshv_vtl_sidecar"

# Linux ioctl number encoding: dir (2 bits) << 30 | size (14 bits) << 16 | type << 8 | nr.
_IOC_NONE: Final = 0
_IOC_WRITE: Final = 1
_IOC_READ: Final = 2


def ioc(direction: int, kind: int, nr: int, size: int) -> int:
    """The Linux ``_IOC`` macro."""
    return direction << 30 | size << 16 | kind << 8 | nr


SIDECAR_MAGIC: Final = 0xB8
SIDECAR_START: Final = ioc(_IOC_NONE, SIDECAR_MAGIC, 0xF0, 0)  # _IO(0xB8, 0xF0)
SIDECAR_STOP: Final = ioc(_IOC_NONE, SIDECAR_MAGIC, 0xF1, 0)  # _IO(0xB8, 0xF1)
SIDECAR_RUN: Final = ioc(_IOC_NONE, SIDECAR_MAGIC, 0xF2, 0)  # _IO(0xB8, 0xF2)
SIDECAR_INFO: Final = ioc(_IOC_READ, SIDECAR_MAGIC, 0xF3, NODE_INFO.size)  # _IOR(.., 12 bytes)
assert (SIDECAR_START, SIDECAR_STOP, SIDECAR_RUN, SIDECAR_INFO) == (
    0xB8F0,
    0xB8F1,
    0xB8F2,
    0x800CB8F3,
)

#: ``fcntl.ioctl``'s shape, so tests can stand in for a kernel that is not there.
IoctlFunction = Callable[..., object]


class KernelNode:
    """One open ``/dev/mshv_vtl_sidecarN``. Implements :class:`SidecarNode`."""

    def __init__(
        self, path: str, index: int, fd: int, *, ioctl: IoctlFunction = fcntl.ioctl
    ) -> None:
        """Take over ``fd``, the open node device at ``path``: read its info and map it."""
        self.path = path
        self._index = index
        self._ioctl = ioctl
        self._fd = fd
        try:
            self._info = self._read_info()
            self._map = self._map_shmem()
        except BaseException:
            os.close(self._fd)
            raise
        self._view = memoryview(self._map)

    def _read_info(self) -> NodeInfo:
        buf = bytearray(NODE_INFO.size)
        try:
            self._ioctl(self._fd, SIDECAR_INFO, buf, True)
        except OSError as exc:
            raise SidecarDriverError(f"sidecar info ioctl on {self.path} failed: {exc}") from exc
        return decode_node_info_untrusted(bytes(buf))

    def _map_shmem(self) -> mmap.mmap:
        length = self._info.cpu_count * self._info.per_cpu_shmem
        try:
            return mmap.mmap(
                self._fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0
            )
        except (OSError, ValueError) as exc:
            raise SidecarDriverError(f"cannot map {length} bytes of {self.path}: {exc}") from exc

    @property
    def index(self) -> int:
        return self._index

    @property
    def info(self) -> NodeInfo:
        return self._info

    @property
    def shmem(self) -> memoryview:
        return self._view

    @property
    def completion_fd(self) -> int:
        return self._fd

    def _cpu_ioctl(self, request: int, what: str, cpu: int) -> None:
        try:
            self._ioctl(self._fd, request, cpu)
        except OSError as exc:
            raise SidecarDriverError(
                f"sidecar {what} ioctl for CPU {cpu} on {self.path} failed: {exc}"
            ) from exc

    def start(self, cpu: int) -> None:
        self._cpu_ioctl(SIDECAR_START, "start", cpu)

    def stop(self, cpu: int) -> None:
        self._cpu_ioctl(SIDECAR_STOP, "stop", cpu)

    def run(self, cpu: int) -> None:
        self._cpu_ioctl(SIDECAR_RUN, "run", cpu)

    def close(self) -> None:
        if self._fd < 0:
            return
        self._view.release()
        # A view someone else still holds keeps the mapping alive until it is dropped.
        with contextlib.suppress(BufferError):
            self._map.close()
        os.close(self._fd)
        self._fd = -1


class KernelDriver:
    """Finds the nodes of the real sidecar. Implements :class:`SidecarDriver`."""

    name = "kernel"

    def __init__(
        self, prefix: str = DEFAULT_DEVICE_PREFIX, *, ioctl: IoctlFunction = fcntl.ioctl
    ) -> None:
        self.prefix = prefix
        self._ioctl = ioctl

    def open_nodes(self) -> list[SidecarNode] | None:
        nodes: list[SidecarNode] = []
        try:
            for index in range(MAX_NODES):
                path = f"{self.prefix}{index}"
                try:
                    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
                except FileNotFoundError:
                    break  # the first missing node ends the enumeration
                except OSError as exc:
                    raise SidecarDriverError(f"cannot open sidecar node {path}: {exc}") from exc
                nodes.append(KernelNode(path, index, fd, ioctl=self._ioctl))
        except BaseException:
            for node in nodes:
                with contextlib.suppress(Exception):
                    node.close()
            raise
        return nodes or None

    def probe(self) -> list[NodeInfo] | None:
        nodes = self.open_nodes()
        if nodes is None:
            return None
        infos = [node.info for node in nodes]
        for node in nodes:
            node.close()
        return infos

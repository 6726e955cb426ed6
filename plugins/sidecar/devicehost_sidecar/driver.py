"""The driver seam: what the client needs from a sidecar node, and from whatever finds the nodes.

Two implementations exist: :mod:`devicehost_sidecar.kernel` (the ``/dev/mshv_vtl_sidecarN``
character devices) and :mod:`devicehost_sidecar.simulator` (a simulated sidecar kernel with the
same page layout and completion protocol). The client sees only these protocols.
"""

from __future__ import annotations

from typing import Protocol

from devicehost_sidecar.protocol import (
    NodeInfo,
)

__all__ = ["SidecarDriver", "SidecarNode"]


class SidecarNode(Protocol):
    """One open node: a range of CPUs sharing a completion fd.

    ``shmem`` is the node's shared mapping, ``cpu_count x per_cpu_shmem`` bytes; CPU ``i`` of the
    node (absolute CPU ``base_cpu + i``) has its command page at ``i x per_cpu_shmem`` followed by
    its hypervisor register page. ``completion_fd`` is non-blocking and readable when an
    asynchronous command (one begun with :meth:`start`) finished: each read of 4 bytes yields the
    absolute CPU number (u32 little-endian) of a finished CPU. CPU numbers passed to the methods
    are absolute.
    """

    @property
    def index(self) -> int: ...

    @property
    def info(self) -> NodeInfo: ...

    @property
    def shmem(self) -> memoryview: ...

    @property
    def completion_fd(self) -> int: ...

    def start(self, cpu: int) -> None:
        """Begin the command in ``cpu``'s command page; completion is reported on the fd."""

    def stop(self, cpu: int) -> None:
        """Ask ``cpu`` to end its running command early (RUN_VP returns without an intercept)."""

    def run(self, cpu: int) -> None:
        """Run the command in ``cpu``'s command page and return when it is done."""

    def close(self) -> None:
        """Unmap the shared memory and close the node. Views of ``shmem`` must be released."""


class SidecarDriver(Protocol):
    """Finds the nodes of a sidecar."""

    @property
    def name(self) -> str: ...

    def probe(self) -> list[NodeInfo] | None:
        """Describe the nodes without keeping them open; ``None`` if there is no sidecar."""

    def open_nodes(self) -> list[SidecarNode] | None:
        """Open and map every node, in node order; ``None`` if there is no sidecar."""

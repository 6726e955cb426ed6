"""The memory of one Hyper-V ring (control page + data area) and the ring's corruption errors.

:class:`RingMemory` is what :mod:`devicehost.vmbus.ring` reads and writes: contiguous memory
(the fast path) or guest pages scattered in guest memory, wrapped around the data area's end.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from devicehost.memory import PAGE_SIZE, GuestMemory, GuestMemoryError

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["CONTROL_SIZE", "RingError", "RingErrorKind", "RingMemory"]

CONTROL_SIZE: Final = PAGE_SIZE


class RingErrorKind(enum.Enum):
    """What exactly is corrupt."""

    INVALID_RING_POINTER = "InvalidRingPointer"
    INVALID_DATA_AVAILABLE = "InvalidDataAvailable"
    INVALID_DESCRIPTOR_LENGTHS = "InvalidDescriptorLengths"
    INVALID_DESCRIPTOR_FLAGS = "InvalidDescriptorFlags"
    INVALID_DESCRIPTOR_TYPE = "InvalidDescriptorType"
    INVALID_MESSAGE_LENGTH = "InvalidMessageLength"
    INVALID_RING_MEMORY = "InvalidRingMemory"


class RingError(Exception):
    """Raised when the ring's memory is corrupt (the peer's fault) or a message can never fit
    (InvalidMessageLength, the caller's fault). The channel cannot be used any more."""

    def __init__(self, kind: RingErrorKind, detail: str = "") -> None:
        self.kind = kind
        blame = "caller" if kind is RingErrorKind.INVALID_MESSAGE_LENGTH else "peer"
        super().__init__(f"{kind.value} ({blame}'s fault){': ' + detail if detail else ''}")


class RingMemory:
    """The memory of one ring: a control page and a data area of whole pages.

    The data area is either one contiguous memoryview (fast path) or a list of page views
    (pages scattered in guest memory); :meth:`read` and :meth:`write` wrap around its end.
    """

    def __init__(self, control: memoryview, pages: Sequence[memoryview]) -> None:
        if len(control) < CONTROL_SIZE or control.format != "B":
            raise RingError(RingErrorKind.INVALID_RING_MEMORY, "the control page is too small")
        data_len = sum(len(p) for p in pages)
        if data_len == 0 or data_len % PAGE_SIZE or any(len(p) % PAGE_SIZE for p in pages):
            raise RingError(RingErrorKind.INVALID_RING_MEMORY,
                            f"the data area must be whole pages, not {data_len} bytes")
        self.control = control[:CONTROL_SIZE]
        self.words = self.control.cast("I")
        self.data_len = data_len
        #: The data area as one view, or None when its pages are scattered.
        self.data: memoryview | None = pages[0] if len(pages) == 1 else None
        self._pages = [p.cast("B") if p.format != "B" else p for p in pages]
        #: The guest page numbers of the ring (control page first) when it was made over guest
        #: pages (:meth:`from_pages`), else None: what a device worker is told to map
        #: (:mod:`devicehost.vmbus.remote`).
        self.pfns: tuple[int, ...] | None = None

    @classmethod
    def from_view(cls, view: memoryview | bytearray) -> RingMemory:
        """A ring over contiguous memory: the first 4096 bytes are the control page."""
        mv = memoryview(view).cast("B")
        return cls(mv[:CONTROL_SIZE], [mv[CONTROL_SIZE:]])

    @classmethod
    def from_pages(cls, memory: GuestMemory, pfns: Sequence[int]) -> RingMemory:
        """A ring over guest pages: ``pfns[0]`` is the control page, the rest the data area.

        Raises :class:`RingError` (InvalidRingMemory) if a page is outside guest memory.
        """
        if len(pfns) < 2:
            raise RingError(RingErrorKind.INVALID_RING_MEMORY, "a ring needs at least two pages")
        try:
            control = memory.page_view(pfns[0])
            pages: list[memoryview] = []
            run_start, run_len = pfns[1], 1
            for pfn in pfns[2:]:
                if pfn == run_start + run_len:
                    run_len += 1
                    continue
                pages.append(memory.page_view(run_start, run_len))
                run_start, run_len = pfn, 1
            pages.append(memory.page_view(run_start, run_len))
        except GuestMemoryError as exc:
            raise RingError(RingErrorKind.INVALID_RING_MEMORY, str(exc)) from exc
        ring = cls(control, pages)
        ring.pfns = tuple(pfns)
        return ring

    def read(self, offset: int, length: int) -> memoryview | bytes:
        """``length`` bytes at ``offset`` in the data area, wrapping around its end.

        Zero-copy when the bytes are contiguous; a copy when they wrap or cross scattered pages.
        Callers guarantee ``0 <= offset < data_len`` and ``0 <= length <= data_len``.
        """
        end = offset + length
        if self.data is not None:
            if end <= self.data_len:
                return self.data[offset:end]
            return b"".join((self.data[offset:], self.data[: end - self.data_len]))
        parts: list[bytes] = []
        for chunk_off, chunk_len in self._chunks(offset, length):
            for page, start, n in self._locate(chunk_off, chunk_len):
                if n == length:
                    return page[start : start + n]
                parts.append(bytes(page[start : start + n]))
        return b"".join(parts)

    def write(self, offset: int, data: Buffer) -> None:
        """Write ``data`` at ``offset`` in the data area, wrapping around its end."""
        src = memoryview(data).cast("B")
        flat = self.data
        if flat is not None:
            end = offset + len(src)
            if end <= self.data_len:
                flat[offset:end] = src
            else:
                first = self.data_len - offset
                flat[offset:] = src[:first]
                flat[: end - self.data_len] = src[first:]
            return
        pos = 0
        for chunk_off, chunk_len in self._chunks(offset, len(src)):
            for page, start, n in self._locate(chunk_off, chunk_len):
                page[start : start + n] = src[pos : pos + n]
                pos += n

    def _chunks(self, offset: int, length: int) -> list[tuple[int, int]]:
        first = min(length, self.data_len - offset)
        if first == length:
            return [(offset, length)]
        return [(offset, first), (0, length - first)]

    def _locate(self, offset: int, length: int) -> list[tuple[memoryview, int, int]]:
        out: list[tuple[memoryview, int, int]] = []
        base = 0
        for page in self._pages:
            size = len(page)
            if length and offset < base + size:
                start = max(offset - base, 0)
                n = min(size - start, length)
                out.append((page, start, n))
                offset += n
                length -= n
            base += size
        return out

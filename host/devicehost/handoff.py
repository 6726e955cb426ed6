"""The handoff: a live device's saved state and file descriptors, moved to another process.

This is the one seam every process move uses (``DESIGN.md``, "Process seam"): live servicing
(:mod:`devicehost.takeover`, a new ``devicehost`` takes every device over) and, later, device
workers. Two halves:

**The fd stash** (:class:`FdStash`, a device's ``ctx.fds``). A device declares the descriptors its
resources hold while it saves: in ``save_open`` it calls :meth:`FdStash.put` for each and records
the returned *handle* (a small int) in its saved state; in ``restore_open`` it calls
:meth:`FdStash.take` with that handle and the kind it expects, and owns the descriptor it gets.
``put`` duplicates the descriptor, so the device's own stays open (a handoff that rolls back
resumes the device from its live state). When the state goes to a file (``--state``) no
descriptor travels: ``put`` still returns a handle, :attr:`FdStash.carries_fds` is False, and
``take`` raises :class:`HandoffError` (the host then opens the device fresh, as for any failed
restore).

**The wire** (over a connected ``AF_UNIX`` stream socket; the receiver treats all of it as
hostile, like a state file)::

    frame    = header, then `length` payload bytes
    header   = magic "DHHO" | version u16 | kind u16 | length u32 | nfds u16 | zero u16  (BE)
    STATE    kind 1, nfds 0: payload = table_len u32 | table (UTF-8 JSON) | envelope
             table = [[DEVICE, HANDLE, KIND], ...]   one row per descriptor, in sending order
             envelope = the saved-state envelope (devicehost.savedstate), as --state writes it
    FDS      kind 2, length 0, 1 <= nfds <= 253: the next nfds descriptors of the table,
             attached to the header with SCM_RIGHTS

The kernel passes at most 253 descriptors per message (SCM_MAX_FD), so they travel in chunks.
The receiver refuses (:class:`HandoffError`, the sender to blame): a wrong magic, version or kind,
a payload over :data:`MAX_PAYLOAD`, more than :data:`MAX_FDS` descriptors, a table that is not a
list of ``[str, int >= 0, str]`` rows or repeats a (device, handle), a chunk whose descriptors
were truncated (``MSG_CTRUNC``) or whose count differs from its header, descriptors where none
were announced, and any descriptor whose kind (read from the kernel, :func:`devicehost.fds.fd_kind`)
differs from the table or is not one of :data:`FD_KINDS`. Every descriptor received before a
refusal is closed. The envelope itself is decoded later by the host
(:func:`devicehost.savedstate.decode_envelope_untrusted`).
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import struct
from collections.abc import Iterable
from typing import Final, Protocol

import anyio
import attrs

from devicehost.errors import DeviceHostError
from devicehost.excerpt import excerpt
from devicehost.fds import FdKindError, fd_kind
from devicehost.savedstate import MAX_ENVELOPE_BYTES

__all__ = [
    "FDS_PER_MESSAGE",
    "FD_KINDS",
    "HANDOFF_MAGIC",
    "HANDOFF_VERSION",
    "HEADER_SIZE",
    "MAX_FDS",
    "MAX_PAYLOAD",
    "FdStash",
    "FrameHeader",
    "Handoff",
    "HandoffError",
    "HandoffFd",
    "decode_header_untrusted",
    "decode_state_untrusted",
    "encode_fds_header",
    "encode_state_frame",
    "receive_handoff",
    "send_handoff",
]

HANDOFF_MAGIC: Final = b"DHHO"
HANDOFF_VERSION: Final = 1
KIND_STATE: Final = 1
KIND_FDS: Final = 2
#: Descriptors per SCM_RIGHTS message (the kernel's SCM_MAX_FD).
FDS_PER_MESSAGE: Final = 253
#: Descriptors one handoff may carry.
MAX_FDS: Final = 16384
_MAX_TABLE: Final = 4 << 20
#: The largest STATE payload: a table and an envelope of the largest size a state file may have.
MAX_PAYLOAD: Final = 4 + _MAX_TABLE + MAX_ENVELOPE_BYTES
#: The kinds a descriptor in a handoff may be; anything else (a directory, an unknown anon
#: inode) is refused.
FD_KINDS: Final = frozenset(
    {"eventfd", "memfd", "regular", "socket", "fifo", "chardev", "anon_inode:timerfd"}
)
_MAX_NAME: Final = 256

# Byte layout of a frame header (big-endian): magic 4s, version u16, kind u16, payload length u32,
# descriptors attached u16, zero u16.
_HEADER: Final = struct.Struct(">4sHHIHH")
_TABLE_LEN: Final = struct.Struct(">I")
#: Bytes in a frame header.
HEADER_SIZE: Final = _HEADER.size


class HandoffError(DeviceHostError):
    """Raised when a handoff cannot be made or is malformed; the message says which side is to
    blame (the sending process, the receiving one, or a device)."""


class _FileLike(Protocol):
    def fileno(self) -> int: ...


@attrs.frozen
class HandoffFd:
    """One descriptor in transit: device ``device``'s handle ``handle``, of kind ``kind``."""

    device: str
    handle: int
    kind: str
    fd: int


@attrs.frozen
class Handoff:
    """What moves: the saved-state envelope and the descriptors it names (owned by whoever holds
    the value: :meth:`close` closes them)."""

    envelope: bytes
    fds: tuple[HandoffFd, ...] = ()

    def close(self) -> None:
        """Close every descriptor."""
        for item in self.fds:
            _close(item.fd)

    def by_device(self) -> dict[str, dict[int, tuple[int, str]]]:
        """Device name -> handle -> (fd, kind)."""
        out: dict[str, dict[int, tuple[int, str]]] = {}
        for item in self.fds:
            out.setdefault(item.device, {})[item.handle] = (item.fd, item.kind)
        return out


@attrs.frozen
class FrameHeader:
    """A decoded frame header."""

    kind: int
    length: int
    nfds: int


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


# -- the fd stash ---------------------------------------------------------------------------------


class FdStash:
    """A device's descriptors in transit; a device reaches it as ``ctx.fds`` (module docstring).

    Saving: :meth:`put` each descriptor, keep the handle in the saved state. Restoring:
    :meth:`take` it back by handle with the kind expected.
    """

    def __init__(self) -> None:
        self._carry = False
        self._out: list[tuple[int, str]] = []  # handle = index; (dup'ed fd or -1, kind)
        self._in: dict[int, tuple[int, str]] = {}

    @property
    def carries_fds(self) -> bool:
        """True while a save is for a handoff (the descriptors :meth:`put` travel) and while a
        restore comes from one (:meth:`take` can give them back); False for a ``--state`` file."""
        return self._carry

    def put(self, fd: int | _FileLike) -> int:
        """Declare descriptor ``fd`` (or an object with ``fileno()``) as part of the device's
        saved state; returns its handle. The stash keeps a duplicate: ``fd`` stays the device's.
        """
        number = fd if isinstance(fd, int) else fd.fileno()
        kind = fd_kind(number)
        if kind not in FD_KINDS:
            raise HandoffError(f"the device put a descriptor of kind {kind!r}, which cannot be"
                               f" handed over (handed over: {', '.join(sorted(FD_KINDS))})")
        copy = -1
        if self._carry:
            copy = os.dup(number)  # O_CLOEXEC: os.dup makes non-inheritable descriptors
        self._out.append((copy, kind))
        return len(self._out) - 1

    def take(self, handle: int, kind: str) -> int:
        """The descriptor saved under ``handle``, now the caller's; :class:`HandoffError` if there
        is none (e.g. the state came from a file, without descriptors) and
        :class:`~devicehost.fds.FdKindError` if it is not of ``kind`` (it is closed)."""
        entry = self._in.pop(handle, None)
        if entry is None:
            why = ("the saved state came without its descriptors (a --state file)"
                   if not self._carry else "the handoff holds no descriptor under it")
            raise HandoffError(f"no descriptor under handle {handle}: {why}")
        fd, _ = entry
        actual = fd_kind(fd)
        if actual != kind:
            _close(fd)
            raise FdKindError(f"descriptor {handle}: expected a {kind}, got a {actual}")
        return fd

    def take_socket(self, handle: int) -> socket.socket:
        """:meth:`take` of a socket, as a :class:`socket.socket` (family and type from the
        kernel)."""
        return socket.socket(fileno=self.take(handle, "socket"))

    # -- the host's side --------------------------------------------------------------------------

    def begin_save(self, *, carry: bool) -> None:
        """(host) A save begins; ``carry``: its descriptors will travel."""
        self.discard()
        self._carry = carry

    def drain(self) -> list[tuple[int, str, int]]:
        """(host) The descriptors put since :meth:`begin_save`: (handle, kind, fd), now the
        caller's; the stash is empty after."""
        out = [(h, kind, fd) for h, (fd, kind) in enumerate(self._out) if fd >= 0]
        self._out = []
        self._carry = False
        return out

    def load(self, fds: dict[int, tuple[int, str]]) -> None:
        """(host) A restore from a handoff begins: ``fds`` are handle -> (fd, kind), the
        stash's until taken."""
        self.discard()
        self._carry = True
        self._in = dict(fds)

    def take_all(self) -> dict[int, tuple[int, str]]:
        """(host) Every descriptor a restore could take, as handle -> (fd, kind), now the
        caller's: a device in a worker takes them in the worker's stash."""
        taken, self._in = self._in, {}
        return taken

    def discard(self) -> list[int]:
        """(host) Close every descriptor the stash still holds; the handles that were not taken
        on a restore."""
        for fd, _ in self._out:
            if fd >= 0:
                _close(fd)
        untaken = sorted(self._in)
        for fd, _ in self._in.values():
            _close(fd)
        self._out, self._in, self._carry = [], {}, False
        return untaken


# -- encoding / decoding (sans I/O) ---------------------------------------------------------------


def encode_state_frame(envelope: bytes, fds: Iterable[HandoffFd]) -> bytes:
    """The STATE frame for ``envelope`` and the table of ``fds``."""
    table = json.dumps([[f.device, f.handle, f.kind] for f in fds],
                       separators=(",", ":")).encode()
    payload = _TABLE_LEN.pack(len(table)) + table + envelope
    if len(table) > _MAX_TABLE or len(payload) > MAX_PAYLOAD:
        raise HandoffError(f"the handoff is too large to send ({len(payload)} bytes)")
    return _HEADER.pack(HANDOFF_MAGIC, HANDOFF_VERSION, KIND_STATE, len(payload), 0, 0) + payload


def encode_fds_header(count: int) -> bytes:
    """The header of an FDS frame carrying ``count`` descriptors."""
    if not 1 <= count <= FDS_PER_MESSAGE:
        raise HandoffError(f"an FDS frame carries 1..{FDS_PER_MESSAGE} descriptors, not {count}")
    return _HEADER.pack(HANDOFF_MAGIC, HANDOFF_VERSION, KIND_FDS, 0, count, 0)


def decode_header_untrusted(data: bytes) -> FrameHeader:
    """A frame header; :class:`HandoffError` blaming the sender if it is malformed."""
    if len(data) != _HEADER.size:
        raise HandoffError(f"the sender's frame header has {len(data)} bytes, not {_HEADER.size}")
    magic, version, kind, length, nfds, zero = _HEADER.unpack(data)
    if magic != HANDOFF_MAGIC:
        raise HandoffError(f"the sender's frame does not start with {HANDOFF_MAGIC!r}")
    if version != HANDOFF_VERSION:
        raise HandoffError(f"the sender speaks handoff version {version}; this devicehost"
                           f" speaks version {HANDOFF_VERSION}")
    if zero != 0:
        raise HandoffError("the sender's frame header has a non-zero reserved field")
    if kind == KIND_STATE:
        if nfds != 0 or length > MAX_PAYLOAD or length < _TABLE_LEN.size:
            raise HandoffError(f"the sender's STATE frame announces {length} bytes and {nfds}"
                               f" descriptors (at most {MAX_PAYLOAD} bytes, no descriptors)")
    elif kind == KIND_FDS:
        if length != 0 or not 1 <= nfds <= FDS_PER_MESSAGE:
            raise HandoffError(f"the sender's FDS frame announces {length} bytes and {nfds}"
                               f" descriptors (none, and 1..{FDS_PER_MESSAGE})")
    else:
        raise HandoffError(f"the sender sent a frame of unknown kind {kind}")
    return FrameHeader(kind, length, nfds)


def decode_state_untrusted(payload: bytes) -> tuple[list[tuple[str, int, str]], bytes]:
    """A STATE payload's descriptor table and envelope; :class:`HandoffError` blaming the
    sender."""
    if len(payload) < _TABLE_LEN.size:
        raise HandoffError("the sender's STATE payload is too short for its table length")
    (table_len,) = _TABLE_LEN.unpack_from(payload)
    if table_len > _MAX_TABLE or _TABLE_LEN.size + table_len > len(payload):
        raise HandoffError(f"the sender's descriptor table of {table_len} bytes does not fit")
    raw = payload[_TABLE_LEN.size:_TABLE_LEN.size + table_len]
    try:
        rows = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise HandoffError(f"the sender's descriptor table is not JSON: {type(exc).__name__}"
                           ) from exc
    if not isinstance(rows, list) or len(rows) > MAX_FDS:
        raise HandoffError(f"the sender's descriptor table is not a list of at most {MAX_FDS}")
    table: list[tuple[str, int, str]] = []
    seen: set[tuple[str, int]] = set()
    for index, row in enumerate(rows):
        if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str)
                and 0 < len(row[0]) <= _MAX_NAME and type(row[1]) is int
                and 0 <= row[1] < MAX_FDS and isinstance(row[2], str) and row[2] in FD_KINDS):
            raise HandoffError(f"the sender's descriptor table row {index} is not"
                               f" [device, handle, kind]: {excerpt(row)}")
        key = (row[0], row[1])
        if key in seen:
            raise HandoffError(f"the sender's descriptor table names {excerpt(key)} twice")
        seen.add(key)
        table.append((row[0], row[1], row[2]))
    return table, bytes(payload[_TABLE_LEN.size + table_len:])


# -- the I/O shell --------------------------------------------------------------------------------


async def _send_all(sock: socket.socket, data: bytes, fds: list[int] | None = None) -> None:
    view = memoryview(data)
    ancillary = fds
    while view:
        try:
            if ancillary:
                sent = socket.send_fds(sock, [view], ancillary)
                ancillary = None
            else:
                sent = sock.send(view)
        except (BlockingIOError, InterruptedError):
            await anyio.wait_writable(sock)
            continue
        view = view[sent:]


async def send_handoff(sock: socket.socket, handoff: Handoff) -> None:
    """Send ``handoff`` on the non-blocking stream socket ``sock`` (the descriptors are
    duplicated into the receiver; the caller still owns its own). OSError if the peer is gone."""
    if len(handoff.fds) > MAX_FDS:
        raise HandoffError(f"a handoff carries at most {MAX_FDS} descriptors, not"
                           f" {len(handoff.fds)}")
    await _send_all(sock, encode_state_frame(handoff.envelope, handoff.fds))
    fds = [f.fd for f in handoff.fds]
    for start in range(0, len(fds), FDS_PER_MESSAGE):
        chunk = fds[start:start + FDS_PER_MESSAGE]
        await _send_all(sock, encode_fds_header(len(chunk)), chunk)


def _cmsg_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            items = array.array("i")
            items.frombytes(data[: len(data) - len(data) % items.itemsize])
            fds.extend(items)
    return fds


async def _recv_exactly(sock: socket.socket, count: int, fds: list[int],
                        *, first_carries: int) -> bytes:
    """``count`` bytes; descriptors arriving with them are appended to ``fds``.
    ``first_carries``: how many may arrive (0: any that do are a protocol error)."""
    data = bytearray()
    space = socket.CMSG_SPACE(FDS_PER_MESSAGE * 4)
    while len(data) < count:
        try:
            chunk, ancdata, flags, _ = sock.recvmsg(min(count - len(data), 1 << 20), space)
        except (BlockingIOError, InterruptedError):
            await anyio.wait_readable(sock)
            continue
        fds.extend(_cmsg_fds(ancdata))
        if flags & socket.MSG_CTRUNC:
            raise HandoffError("the sender's descriptors were truncated (MSG_CTRUNC): more than"
                               f" {FDS_PER_MESSAGE} in one message, or this process is out of"
                               " descriptors")
        if not chunk:
            raise HandoffError("the sender closed the connection inside the handoff")
        data += chunk
    if len(fds) > first_carries:
        raise HandoffError(f"the sender attached {len(fds)} descriptors where"
                           f" {first_carries} were announced")
    return bytes(data)


async def _receive_fds(sock: socket.socket, want: int, into: list[int]) -> None:
    while len(into) < want:
        got: list[int] = []
        try:
            header = decode_header_untrusted(
                await _recv_exactly(sock, _HEADER.size, got, first_carries=FDS_PER_MESSAGE))
            if header.kind != KIND_FDS:
                raise HandoffError("the sender sent another frame where descriptors were due")
            if len(got) != header.nfds or len(into) + len(got) > want:
                raise HandoffError(f"the sender's FDS frame announced {header.nfds} descriptors"
                                   f" and attached {len(got)}")
        finally:
            into.extend(got)


async def receive_handoff(sock: socket.socket, *, header: bytes | None = None) -> Handoff:
    """Receive one handoff from the non-blocking stream socket ``sock`` (``header``: the STATE
    header, if the caller already read it). Every check of the module docstring is made;
    :class:`HandoffError` (every received descriptor closed) if one fails."""
    fds: list[int] = []
    try:
        if header is None:
            header = await _recv_exactly(sock, _HEADER.size, fds, first_carries=0)
        state = decode_header_untrusted(header)
        if state.kind != KIND_STATE:
            raise HandoffError("the sender's handoff does not begin with its STATE frame")
        payload = await _recv_exactly(sock, state.length, fds, first_carries=0)
        table, envelope = decode_state_untrusted(payload)
        await _receive_fds(sock, len(table), fds)
        items = []
        for (device, handle, kind), fd in zip(table, fds, strict=True):
            actual = fd_kind(fd)
            if actual != kind:
                raise HandoffError(f"the sender's descriptor {handle} of device"
                                   f" {excerpt(device)} is a {actual}, not the {kind} it said")
            items.append(HandoffFd(device, handle, kind, fd))
        return Handoff(envelope, tuple(items))
    except BaseException:
        for fd in fds:
            _close(fd)
        raise

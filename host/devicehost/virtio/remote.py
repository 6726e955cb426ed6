"""A virtio device across the process seam: what travels between supervisor and worker.

A virtio device that runs in a worker process (``isolation = "process"``) is served by a
transport in the supervisor (the vhost-user backend keeps the VMM connection; the in-process
driver keeps its rings) and runs its hooks in the worker. Four values cross the seam, each a
byte string beside a list of file descriptors (``SCM_RIGHTS``), each decoded by a
``decode_*_untrusted`` function that raises only :class:`RemoteVirtioError` (the sending
process is to blame) and closes every descriptor it was given when it refuses:

- **the offer** (worker -> supervisor): the device's :class:`DeviceTraits`, and whether the
  device reads or writes its config space through methods (then the supervisor forwards those
  accesses to the worker; otherwise it answers from ``traits.config``);
- **the queue resources** (supervisor -> worker, at open and at every re-open after a restart):
  the guest memory regions as their memfds (:meth:`GuestMemory.share` /
  :meth:`GuestMemory.from_shared`), the negotiated features, and for every queue its layout,
  its position (last avail index, used index) and its kick, call and error eventfds. The worker
  builds its own :class:`VirtQueue` s over the same shared memory, so descriptors, payloads and
  notifications go between guest and worker directly: no packet passes through the supervisor;
- **a doorbell update** (supervisor -> worker, while open): the VMM gave a vring a new call or
  error eventfd (vhost-user allows SET_VRING_CALL/ERR at any time; QEMU sends SET_VRING_CALL
  again right after enabling the rings). The worker swaps the fd and rings the new call once
  (an interrupt raised on the old fd in the meantime may be lost; a spurious one is harmless);
- **the queue positions** (worker -> supervisor, at close): where the worker stopped in each
  queue, so the supervisor answers GET_VRING_BASE (and saves) where the device really is.

Byte layouts (little endian)::

    traits     = magic "VTRT" | version u16 | flags u16 | device_id u32 | queue_count u16
                 | max_queue_size u16 | device_features u64 | config_len u16 | config bytes
                 flags: 1 = the device reads its config through a method, 2 = writes it
    resources  = magic "VQRS" | version u16 | region_count u16 | queue_count u16 | zero u16
                 | features u64 | region * region_count | queue * queue_count
    region     = gpa u64 | size u64 | file offset u64          (fd i of the list backs region i)
    queue      = index u16 | size u16 | fd flags u16 | zero u16 | desc u64 | avail u64 | used u64
                 | last_avail_idx u16 | used_idx u16 | zero u32
                 fd flags: 1 = a call fd follows, 2 = an error fd follows (a kick fd always does)
                 after the region fds, each queue's fds in order: kick, then call, then error
    update     = magic "VDBU" | version u16 | queue u16 | which u16 (1 call, 2 error) | has_fd u16
    positions  = magic "VQPS" | version u16 | count u16 | (last_avail_idx u16, used_idx u16) * count

Trust: the worker runs third-party device code, so the supervisor treats everything a worker
sends as hostile (the traits are validated as any offer is; positions are 16-bit values the
supervisor only reports back to the VMM). The worker treats the supervisor's values as untrusted
too (bounded counts, fds checked by kind from the kernel: guest memory must be a memfd sealed
against shrinking unless the operator allowed unsealed memory, doorbells must be eventfds).

Queue positions after a worker crash (:func:`restart_positions`): the dead worker's last avail
index is lost with it. The supervisor reopens every queue at (used, used), where ``used`` is the
used index read from guest memory: the chains the dead worker had popped but not completed are
popped again by the new worker. This is exact for a device that completes the chains of a queue
in the order it popped them (vsock does); a device that completes out of order may see a chain
it already completed again. What the re-seen chains carry is the device's to judge (vsock: tx
packets of connections the new worker does not know get RST; rx buffers are simply filled).
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Sequence
from typing import Final

import attrs

from devicehost.errors import DeviceHostError
from devicehost.fds import FdKindError, require_eventfd
from devicehost.memory import GuestMemory, GuestMemoryError, SharedMemoryError, SharedRegion
from devicehost.virtio.doorbell import EventfdDoorbell
from devicehost.virtio.driver import QueueSetup
from devicehost.virtio.queue import (
    MAX_QUEUE_SIZE,
    U16,
    QueueError,
    QueueLayout,
    QueueState,
    SplitQueue,
)
from devicehost.virtio.traits import DeviceTraits
from devicehost.virtio.transport import QueueResources, VirtQueue, build_queues

__all__ = [
    "CONFIG_READS",
    "CONFIG_WRITES",
    "MAX_QUEUES",
    "MAX_REGIONS",
    "WHICH_CALL",
    "WHICH_ERROR",
    "DoorbellUpdate",
    "RemoteTraits",
    "RemoteVirtioError",
    "apply_doorbell_update",
    "apply_positions",
    "decode_doorbell_update_untrusted",
    "decode_positions_untrusted",
    "decode_queue_resources_untrusted",
    "decode_traits_untrusted",
    "encode_doorbell_update",
    "encode_positions",
    "encode_queue_resources",
    "encode_traits",
    "positions",
    "restart_positions",
]

VERSION: Final = 1
#: Guest memory regions one open may carry (vhost-user's own limit is 8).
MAX_REGIONS: Final = 64
#: Queues one device may have (:class:`DeviceTraits` allows 64).
MAX_QUEUES: Final = 64
#: Traits flags: the device implements ``virtio_config_read`` / ``virtio_config_write``.
CONFIG_READS: Final = 1
CONFIG_WRITES: Final = 2
#: Doorbell update targets, and the queue fd flags of the resources layout.
WHICH_CALL: Final = 1
WHICH_ERROR: Final = 2

# byte layout: traits header = magic 4s, version u16, flags u16, device_id u32, queue_count u16,
# max_queue_size u16, device_features u64, config_len u16
_TRAITS: Final = struct.Struct("<4sHHIHHQH")
# byte layout: resources header = magic 4s, version u16, region_count u16, queue_count u16,
# zero u16, features u64
_RESOURCES: Final = struct.Struct("<4sHHHHQ")
# byte layout: region = gpa u64, size u64, file offset u64
_REGION: Final = struct.Struct("<QQQ")
# byte layout: queue = index u16, size u16, fd flags u16, zero u16, desc u64, avail u64, used u64,
# last_avail_idx u16, used_idx u16, zero u32
_QUEUE: Final = struct.Struct("<HHHHQQQHHI")
# byte layout: update = magic 4s, version u16, queue u16, which u16, has_fd u16
_UPDATE: Final = struct.Struct("<4sHHHH")
# byte layout: positions header = magic 4s, version u16, count u16; then count * (u16, u16)
_POSITIONS: Final = struct.Struct("<4sHH")
_POSITION: Final = struct.Struct("<HH")

_TRAITS_MAGIC: Final = b"VTRT"
_RESOURCES_MAGIC: Final = b"VQRS"
_UPDATE_MAGIC: Final = b"VDBU"
_POSITIONS_MAGIC: Final = b"VQPS"


class RemoteVirtioError(DeviceHostError):
    """Raised when a virtio value from the other side of the process seam is malformed or its
    descriptors are of the wrong kind (the sending process is to blame), or when a device's
    resources cannot be sent to a worker at all (e.g. anonymous guest memory)."""


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _check_header(data: bytes, layout: struct.Struct, magic: bytes, what: str) -> tuple[int, ...]:
    if len(data) < layout.size:
        raise RemoteVirtioError(f"{what}: {len(data)} bytes, shorter than its {layout.size}-byte"
                                " header")
    fields = layout.unpack_from(data)
    if fields[0] != magic:
        raise RemoteVirtioError(f"{what}: bad magic {fields[0]!r}")
    if fields[1] != VERSION:
        raise RemoteVirtioError(f"{what}: version {fields[1]}, this host speaks {VERSION}")
    return fields


# -- the offer -------------------------------------------------------------------------------------


@attrs.frozen
class RemoteTraits:
    """A worker's virtio offer: the traits and how its config space is reached."""

    traits: DeviceTraits
    config_reads: bool = False
    config_writes: bool = False


def encode_traits(offer: RemoteTraits) -> bytes:
    t = offer.traits
    flags = (CONFIG_READS if offer.config_reads else 0) | (
        CONFIG_WRITES if offer.config_writes else 0)
    return _TRAITS.pack(_TRAITS_MAGIC, VERSION, flags, t.device_id, t.queue_count,
                        t.max_queue_size, t.device_features, len(t.config)) + t.config


def decode_traits_untrusted(data: bytes) -> RemoteTraits:
    """The worker's offer; :class:`RemoteVirtioError` if it is not one a device may make."""
    (_, _, flags, device_id, queue_count, max_queue_size, features, config_len) = _check_header(
        data, _TRAITS, _TRAITS_MAGIC, "the worker's virtio offer")
    if flags & ~(CONFIG_READS | CONFIG_WRITES):
        raise RemoteVirtioError(f"the worker's virtio offer has unknown flags {flags:#x}")
    if len(data) != _TRAITS.size + config_len:
        raise RemoteVirtioError(
            f"the worker's virtio offer announces {config_len} config bytes but carries"
            f" {len(data) - _TRAITS.size}")
    try:
        traits = DeviceTraits(device_id=device_id, device_features=features,
                              queue_count=queue_count, max_queue_size=max_queue_size,
                              config=data[_TRAITS.size:])
    except (ValueError, TypeError) as exc:
        raise RemoteVirtioError(f"the worker's virtio offer is invalid: {exc}") from None
    return RemoteTraits(traits, bool(flags & CONFIG_READS), bool(flags & CONFIG_WRITES))


# -- the queue resources ---------------------------------------------------------------------------


def _doorbell_fd(bell: object) -> int | None:
    if not isinstance(bell, EventfdDoorbell):
        raise RemoteVirtioError(
            f"a queue doorbell is a {type(bell).__name__}, not an eventfd: only eventfd doorbells"
            " can be shared with a worker process")
    return bell.fd


def encode_queue_resources(
    resources: QueueResources, states: Sequence[QueueState] | None = None
) -> tuple[bytes, list[int]]:
    """The value and the descriptors (still the caller's: send them, do not close them) that
    give a worker ``resources``; each queue at ``states[i]`` (default: its current position).

    :class:`RemoteVirtioError` if the memory has an anonymous region or a queue's doorbells are
    not eventfds, or a queue has no kick fd.
    """
    try:
        regions, region_fds = resources.memory.share()
    except SharedMemoryError as exc:
        raise RemoteVirtioError(str(exc)) from None
    if len(regions) > MAX_REGIONS or len(resources.queues) > MAX_QUEUES:
        raise RemoteVirtioError(f"{len(regions)} memory regions and {len(resources.queues)}"
                                f" queues exceed {MAX_REGIONS} and {MAX_QUEUES}")
    if states is not None and len(states) != len(resources.queues):
        raise ValueError(f"{len(states)} states for {len(resources.queues)} queues")
    parts = [_RESOURCES.pack(_RESOURCES_MAGIC, VERSION, len(regions), len(resources.queues), 0,
                             resources.features)]
    parts += [_REGION.pack(r.gpa, r.size, r.offset) for r in regions]
    fds = list(region_fds)
    for i, q in enumerate(resources.queues):
        kick = _doorbell_fd(q.kick)
        if kick is None:
            raise RemoteVirtioError(f"queue {q.index} has no kick eventfd yet")
        call = _doorbell_fd(q.call)
        error = _doorbell_fd(q.error) if q.error is not None else None
        state = states[i] if states is not None else q.state()
        layout = q.queue.layout
        flags = (WHICH_CALL if call is not None else 0) | (WHICH_ERROR if error is not None else 0)
        parts.append(_QUEUE.pack(q.index, layout.size, flags, 0, layout.desc_gpa,
                                 layout.avail_gpa, layout.used_gpa, state.last_avail_idx & 0xFFFF,
                                 state.used_idx & 0xFFFF, 0))
        fds += [fd for fd in (kick, call, error) if fd is not None]
    return b"".join(parts), fds


def decode_queue_resources_untrusted(
    data: bytes, fds: Sequence[int], *, allow_unsealed: bool = False
) -> QueueResources:
    """The worker's :class:`QueueResources` from the supervisor's value and descriptors.

    Takes ownership of ``fds``: they belong to the result (its memory's regions and its queues'
    doorbells), or are all closed when :class:`RemoteVirtioError` is raised.
    """
    pending = list(fds)
    try:
        return _decode_resources(data, pending, allow_unsealed)
    except BaseException:
        _close_all(pending)
        raise


def _decode_resources(data: bytes, pending: list[int], allow_unsealed: bool) -> QueueResources:
    what = "the supervisor's queue resources"
    (_, _, region_count, queue_count, zero, features) = _check_header(
        data, _RESOURCES, _RESOURCES_MAGIC, what)
    if zero:
        raise RemoteVirtioError(f"{what}: reserved field is {zero}, not 0")
    if not 1 <= region_count <= MAX_REGIONS or not 1 <= queue_count <= MAX_QUEUES:
        raise RemoteVirtioError(f"{what}: {region_count} regions and {queue_count} queues (1..."
                                f"{MAX_REGIONS} and 1...{MAX_QUEUES})")
    expected = _RESOURCES.size + region_count * _REGION.size + queue_count * _QUEUE.size
    if len(data) != expected:
        raise RemoteVirtioError(f"{what}: {len(data)} bytes, expected {expected}")
    regions = [
        SharedRegion(*_REGION.unpack_from(data, _RESOURCES.size + i * _REGION.size))
        for i in range(region_count)
    ]
    offset = _RESOURCES.size + region_count * _REGION.size
    queues = [_QUEUE.unpack_from(data, offset + i * _QUEUE.size) for i in range(queue_count)]
    fd_count = region_count
    for i, (index, size, flags, zero_a, *_, zero_b) in enumerate(queues):
        if index != i:
            raise RemoteVirtioError(f"{what}: queue {i} says it is queue {index}")
        if flags & ~(WHICH_CALL | WHICH_ERROR) or zero_a or zero_b:
            raise RemoteVirtioError(f"{what}: queue {i} has unknown flags or reserved bits set")
        if not 1 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise RemoteVirtioError(f"{what}: queue {i} size {size} is not a power of two")
        fd_count += 1 + bool(flags & WHICH_CALL) + bool(flags & WHICH_ERROR)
    if len(pending) != fd_count:
        raise RemoteVirtioError(f"{what}: {len(pending)} descriptors, the value needs {fd_count}")
    for k, fd in enumerate(pending[region_count:]):
        try:
            require_eventfd(fd, f"{what}: doorbell descriptor {k}")
        except FdKindError as exc:
            raise RemoteVirtioError(str(exc)) from None
    region_fds = pending[:region_count]
    try:
        memory = GuestMemory.from_shared(regions, region_fds, allow_unsealed=allow_unsealed,
                                         what=what)
    except SharedMemoryError as exc:
        del pending[:region_count]  # from_shared closed them
        raise RemoteVirtioError(str(exc)) from None
    del pending[:region_count]
    try:
        return _build(memory, features, queues, pending, what)
    except BaseException:
        memory.close()
        raise


def _build(memory: GuestMemory, features: int, queues: list[tuple[int, ...]],
           pending: list[int], what: str) -> QueueResources:
    setups = []
    states = []
    errors: list[EventfdDoorbell | None] = []
    bells: list[EventfdDoorbell] = []
    try:
        for index, size, flags, _, desc, avail, used, last_avail, used_idx, _ in queues:
            kick = EventfdDoorbell(pending.pop(0))
            bells.append(kick)
            call = EventfdDoorbell(pending.pop(0) if flags & WHICH_CALL else None)
            bells.append(call)
            error = EventfdDoorbell(pending.pop(0)) if flags & WHICH_ERROR else None
            if error is not None:
                bells.append(error)
            errors.append(error)
            setups.append(QueueSetup(index, QueueLayout(size, desc, avail, used), kick, call))
            states.append(QueueState(last_avail, used_idx))
        built = build_queues(memory, features, setups, states)
    except QueueError as exc:
        for bell in bells:
            bell.close()
        raise RemoteVirtioError(f"{what}: unusable queue: {exc}") from None
    except BaseException:
        for bell in bells:
            bell.close()
        raise
    for q, error in zip(built, errors, strict=True):
        q.error = error
    return QueueResources(built, features, memory)


# -- doorbell updates ------------------------------------------------------------------------------


@attrs.frozen
class DoorbellUpdate:
    """Queue ``queue``'s call (:data:`WHICH_CALL`) or error (:data:`WHICH_ERROR`) doorbell has
    a new fd (``fd`` None: notifications in that direction are dropped from now on)."""

    queue: int
    which: int
    fd: int | None


def encode_doorbell_update(update: DoorbellUpdate) -> tuple[bytes, list[int]]:
    return (_UPDATE.pack(_UPDATE_MAGIC, VERSION, update.queue, update.which,
                         int(update.fd is not None)),
            [] if update.fd is None else [update.fd])


def decode_doorbell_update_untrusted(data: bytes, fds: Sequence[int]) -> DoorbellUpdate:
    """Takes ownership of ``fds`` (the update's, or closed on :class:`RemoteVirtioError`)."""
    try:
        what = "the supervisor's doorbell update"
        (_, _, queue, which, has_fd) = _check_header(data, _UPDATE, _UPDATE_MAGIC, what)
        if len(data) != _UPDATE.size:
            raise RemoteVirtioError(f"{what}: {len(data)} bytes, expected {_UPDATE.size}")
        if which not in (WHICH_CALL, WHICH_ERROR) or has_fd not in (0, 1):
            raise RemoteVirtioError(f"{what}: doorbell {which} / fd flag {has_fd} unknown")
        if len(fds) != has_fd:
            raise RemoteVirtioError(f"{what}: {len(fds)} descriptors, expected {has_fd}")
        if fds:
            try:
                require_eventfd(fds[0], what)
            except FdKindError as exc:
                raise RemoteVirtioError(str(exc)) from None
        return DoorbellUpdate(queue, which, fds[0] if fds else None)
    except BaseException:
        _close_all(fds)
        raise


def apply_doorbell_update(resources: QueueResources, update: DoorbellUpdate) -> None:
    """Swap the doorbell fd in the worker's queues (owning the new fd; the old one is closed);
    rings a new call doorbell once. :class:`RemoteVirtioError` (fd closed) if the queue does
    not exist."""
    if not 0 <= update.queue < len(resources.queues):
        if update.fd is not None:
            _close_all([update.fd])
        raise RemoteVirtioError(f"doorbell update for queue {update.queue}; the device has"
                                f" {len(resources.queues)}")
    q = resources.queues[update.queue]
    if update.which == WHICH_CALL:
        bell = q.call
        if not isinstance(bell, EventfdDoorbell):  # never: decoded resources use eventfds
            raise RemoteVirtioError("the queue's call doorbell is not an eventfd doorbell")
        bell.set_fd(update.fd)
        bell.ring()
    elif q.error is None:
        q.error = EventfdDoorbell(update.fd)
    else:
        error = q.error
        if not isinstance(error, EventfdDoorbell):
            raise RemoteVirtioError("the queue's error doorbell is not an eventfd doorbell")
        error.set_fd(update.fd)


# -- queue positions -------------------------------------------------------------------------------


def encode_positions(states: Sequence[QueueState]) -> bytes:
    return _POSITIONS.pack(_POSITIONS_MAGIC, VERSION, len(states)) + b"".join(
        _POSITION.pack(s.last_avail_idx & 0xFFFF, s.used_idx & 0xFFFF) for s in states)


def decode_positions_untrusted(data: bytes, count: int) -> tuple[QueueState, ...]:
    """``count`` queue positions (the worker's report at close)."""
    what = "the worker's queue positions"
    (_, _, n) = _check_header(data, _POSITIONS, _POSITIONS_MAGIC, what)
    if n != count or len(data) != _POSITIONS.size + n * _POSITION.size:
        raise RemoteVirtioError(f"{what}: {n} positions in {len(data)} bytes, expected {count}")
    return tuple(QueueState(*_POSITION.unpack_from(data, _POSITIONS.size + i * _POSITION.size))
                 for i in range(n))


def restart_positions(resources: QueueResources) -> list[QueueState]:
    """Where a new worker resumes each queue after the previous one died: (used, used), the used
    index read from guest memory (module docstring). :class:`RemoteVirtioError` if a used ring
    is no longer in guest memory."""
    out = []
    for q in resources.queues:
        try:
            used = U16.unpack(resources.memory.read(q.queue.layout.used_gpa + 2, 2))[0]
        except GuestMemoryError as exc:
            raise RemoteVirtioError(f"queue {q.index}'s used ring is unreadable: {exc}") from None
        out.append(QueueState(used, used))
    return out


def apply_positions(resources: QueueResources, states: Sequence[QueueState]) -> None:
    """Move the supervisor's queues to ``states`` (the worker's report at close, or
    :func:`restart_positions`), so that GET_VRING_BASE and saves report them."""
    if len(states) != len(resources.queues):
        raise ValueError(f"{len(states)} positions for {len(resources.queues)} queues")
    for q, state in zip(resources.queues, states, strict=True):
        old = q.queue
        q.queue = SplitQueue(old.memory, old.layout, event_idx=old.event_idx,
                             indirect=old.indirect, state=state)


def positions(queues: Sequence[VirtQueue]) -> list[QueueState]:
    """The current positions of ``queues`` (what a worker reports at close)."""
    return [q.state() for q in queues]

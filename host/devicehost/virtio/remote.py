"""A virtio device across the process seam: what travels between supervisor and worker.

A virtio device that runs in a worker process (``isolation = "process"``) is served by a
transport in the supervisor (the vhost-user backend keeps the VMM connection; the in-process
driver keeps its rings) and runs its hooks in the worker. Two values cross the seam, each a byte
string beside a list of file descriptors (``SCM_RIGHTS``), each decoded by a
``decode_*_untrusted`` function that raises only :class:`RemoteVirtioError` (the sending process
is to blame) and closes every descriptor it was given when it refuses:

- **the offer** (worker -> supervisor): the device's :class:`DeviceTraits`. Its ``config`` is
  what the supervisor's transport answers config-space reads with: a device method
  ``virtio_config_read``/``virtio_config_write`` is not forwarded to a worker (the transports
  call it synchronously; a worker's answer would block the supervisor's event loop), so an
  isolated device must offer its config space as it is (vsock's is its constant guest CID);
- **the queue resources** (supervisor -> worker, at open and at every re-open after a restart):
  the guest memory regions as their memfds (:meth:`GuestMemory.share` /
  :meth:`GuestMemory.from_shared`), the negotiated features, and for every queue its layout,
  its position (last avail index, used index) and its kick, call and error eventfds. The worker
  builds its own :class:`VirtQueue` s over the same shared memory, so descriptors, payloads and
  notifications go between guest and worker directly: no packet passes through the supervisor.

**Doorbells that change while open.** vhost-user lets the VMM replace a vring's call and error
eventfds at any time (QEMU 7.2 sends SET_VRING_CALL again right after enabling the rings, and
again when the guest masks an interrupt vector). The resources therefore carry an *update link*:
one end of a datagram socketpair and a small shared page holding a generation counter. When a
supervisor-side doorbell gets a new fd (:attr:`EventfdDoorbell.on_fd_change`), the supervisor
sends the current fds of every doorbell it follows (a snapshot: only the latest matters, so when
the worker has let the socket's queue fill up the supervisor discards the unread snapshots and
sends again) and then increments the counter; every ring of a call or error doorbell in the
worker first compares the counter (a memory read, no system call) and, when it moved, takes the
latest snapshot's fds before it rings. An interrupt the worker raised on the old fd in between is
not lost: the supervisor rings the new fd after incrementing the counter (the vhost-user session
does), and the worker's used-index store precedes its counter load (the queue's barrier before
the interrupt decision), so either the worker rings the new fd or the guest sees its used entry
on the supervisor's ring.

**Queue positions.** A worker's queues start where the supervisor's were, chains in flight
included (:attr:`QueueState.inflight`: a queue restored from a handover replays them first).
While a worker owns a device's queues the supervisor never pops them; its queues report the
position (used, used), ``used`` being the used index read from guest memory
(:func:`restart_positions`). That is where a device that stopped (closed, or its worker died)
can be resumed: the chains a worker had popped but not completed are popped again. GET_VRING_BASE
and saves report it; a re-open after a worker restart starts there. This is exact for a device
that completes the chains of a queue in the order it popped them (vsock does); a device that
completes out of order may see a chain it already completed again, and must not be isolated.
What the re-seen chains carry is the device's to judge (vsock: tx packets of connections the new
worker does not know get RST; rx buffers are simply filled).

Byte layouts (little endian)::

    traits     = magic "VTRT" | version u16 | zero u16 | device_id u32 | queue_count u16
                 | max_queue_size u16 | device_features u64 | config_len u16 | config bytes
    resources  = magic "VQRS" | version u16 | region_count u16 | queue_count u16 | zero u16
                 | features u64 | region * region_count | queue * queue_count
    region     = gpa u64 | size u64 | file offset u64          (fd i of the list backs region i)
    queue      = index u16 | size u16 | fd flags u16 | zero u16 | desc u64 | avail u64 | used u64
                 | last_avail_idx u16 | used_idx u16 | inflight_count u16 | zero u16
                 fd flags: 1 = a call fd follows, 2 = an error fd follows (a kick fd always does)
                 then, queue by queue, inflight_count u16 heads: the chains in flight (popped
                 and not returned, in pop order: :attr:`QueueState.inflight`), which the
                 worker's queue replays first
                 fds: the region fds; each queue's kick, call, error; the update socket; the page
    update     = magic "VDBU" | version u16 | count u16 | entry * count       (one datagram on
                 the update socket, the entries' fds attached in order)
    entry      = queue u16 | which u16 (1 call, 2 error) | has_fd u16 | zero u16
    page       = generation le64 at offset 0 (4096 bytes, a sealed memfd)

Trust: the worker runs third-party device code, so the supervisor treats what a worker sends as
hostile (the traits are validated as any offer is). The worker treats the supervisor's values as
untrusted too (bounded counts, fds checked by kind from the kernel: guest memory must be a memfd
sealed against shrinking unless the operator allowed unsealed memory, doorbells must be
eventfds, the page a sealed memfd, the link a socket).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import attrs

from devicehost.errors import DeviceHostError
from devicehost.excerpt import excerpt
from devicehost.fds import F_SEAL_SHRINK, FdKindError, fd_kind, memfd_seals, require_eventfd
from devicehost.memory import (
    GuestMemory,
    MemoryRegion,
    SharedMemoryError,
    SharedRegion,
)
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
from devicehost.worker.codec import CodecError, Decoder, Encoder, register_codec

if TYPE_CHECKING:
    from devicehost.lifecycle import Device

__all__ = [
    "MAX_QUEUES",
    "MAX_REGIONS",
    "WHICH_CALL",
    "WHICH_ERROR",
    "DoorbellState",
    "RemoteVirtioError",
    "decode_doorbell_state_untrusted",
    "decode_queue_resources_untrusted",
    "decode_traits_untrusted",
    "encode_doorbell_state",
    "encode_queue_resources",
    "encode_traits",
    "release_queue_resources",
    "runs_in_worker",
]

log = logging.getLogger("devicehost.virtio.remote")

VERSION: Final = 1
#: Guest memory regions one open may carry (vhost-user's own limit is 8).
MAX_REGIONS: Final = 64
#: Queues one device may have (:class:`DeviceTraits` allows 64).
MAX_QUEUES: Final = 64
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
# last_avail_idx u16, used_idx u16, inflight_count u16, zero u16
_QUEUE: Final = struct.Struct("<HHHHQQQHHHH")
# byte layout: update = magic 4s, version u16, count u16; then count entries
_UPDATE: Final = struct.Struct("<4sHH")
# byte layout: update entry = queue u16, which u16, has_fd u16, zero u16
_ENTRY: Final = struct.Struct("<HHHH")
#: Descriptors one update may carry: a call and an error fd per queue.
_MAX_UPDATE_FDS: Final = 2 * 64
# byte layout: the update page = generation le64 at offset 0
_PAGE_SIZE: Final = 4096

_TRAITS_MAGIC: Final = b"VTRT"
_RESOURCES_MAGIC: Final = b"VQRS"
_UPDATE_MAGIC: Final = b"VDBU"


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


def encode_traits(traits: DeviceTraits) -> bytes:
    return _TRAITS.pack(_TRAITS_MAGIC, VERSION, 0, traits.device_id, traits.queue_count,
                        traits.max_queue_size, traits.device_features, len(traits.config)
                        ) + traits.config


def decode_traits_untrusted(data: bytes) -> DeviceTraits:
    """The worker's offer; :class:`RemoteVirtioError` if it is not one a device may make."""
    (_, _, flags, device_id, queue_count, max_queue_size, features, config_len) = _check_header(
        data, _TRAITS, _TRAITS_MAGIC, "the worker's virtio offer")
    if flags:
        raise RemoteVirtioError(f"the worker's virtio offer has unknown flags {flags:#x}")
    if len(data) != _TRAITS.size + config_len:
        raise RemoteVirtioError(
            f"the worker's virtio offer announces {config_len} config bytes but carries"
            f" {len(data) - _TRAITS.size}")
    try:
        return DeviceTraits(device_id=device_id, device_features=features,
                            queue_count=queue_count, max_queue_size=max_queue_size,
                            config=data[_TRAITS.size:])
    except (ValueError, TypeError) as exc:
        raise RemoteVirtioError(f"the worker's virtio offer is invalid: {exc}") from None


# -- the queue resources ---------------------------------------------------------------------------


#: The link that follows each supervisor-side doorbell (at most one).
_FOLLOWING: weakref.WeakKeyDictionary[EventfdDoorbell, _SupervisorLink] = (
    weakref.WeakKeyDictionary())


class _SupervisorLink:
    """The supervisor's end of an update link (module docstring): follows the call and error
    doorbells of one open device's queues and sends the worker their current fds, all of them
    in each datagram (a snapshot: the worker needs only the latest)."""

    def __init__(self) -> None:
        self.sock, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.peer.setblocking(False)
        self.page = MemoryRegion.memfd(0, _PAGE_SIZE, "devicehost-virtio-updates")
        self._generation = self.page.view.cast("Q")
        self.bells: dict[tuple[int, int], EventfdDoorbell] = {}
        self.closed = False
        self.failed = False

    def follow(self, queue: int, which: int, bell: EventfdDoorbell) -> None:
        previous = _FOLLOWING.get(bell)
        if previous is not None and previous is not self:
            previous.close()  # the doorbell's device was opened again: the old link is done
        _FOLLOWING[bell] = self

        def changed(fd: int | None, closed: bool) -> None:
            if closed:
                self.close()
            else:
                self.send()

        bell.on_fd_change = changed
        self.bells[queue, which] = bell

    def snapshot(self) -> DoorbellState:
        return DoorbellState(tuple((q, w, bell.fd) for (q, w), bell in self.bells.items()))

    def send(self) -> None:
        if self.closed:
            return
        data, fds = encode_doorbell_state(self.snapshot())
        for attempt in range(2):
            try:
                socket.send_fds(self.sock, [data], fds) if fds else self.sock.send(data)
                break
            except BlockingIOError:
                if attempt == 0:
                    self._drop_unread()  # superseded by this snapshot; then try again
                    continue
                self._send_failed("the worker's queue stays full")
                return
            except OSError as exc:  # the worker is gone: its successor gets a new link
                self._send_failed(str(exc))
                return
        # After the datagram (module docstring): a worker that sees the new generation finds it.
        self._generation[0] = (self._generation[0] + 1) & 0xFFFF_FFFF_FFFF_FFFF

    def _drop_unread(self) -> None:
        """Discard the snapshots the worker has not read yet (through the supervisor's copy of
        the worker's end): the one being sent supersedes them."""
        while True:
            try:
                _, fds, _, _ = socket.recv_fds(self.peer, 64, _MAX_UPDATE_FDS)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            _close_all(fds)

    def _send_failed(self, why: str) -> None:
        if not self.failed:  # once per link: a VMM may change its doorbells at any rate
            log.warning("virtio doorbell update not sent to the worker: %s", why)
        self.failed = True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for bell in self.bells.values():
            bell.on_fd_change = None
        self.bells.clear()
        self._generation.release()
        self.page.close()
        self.sock.close()
        self.peer.close()


class _HeldQueue(SplitQueue):
    """The supervisor's side of a queue that a worker pops: never popped here; its position is
    (used, used), read from guest memory (module docstring), and it holds the update link."""

    link: _SupervisorLink | None = None

    @property
    def last_avail_idx(self) -> int:
        return self._used_now()

    @last_avail_idx.setter
    def last_avail_idx(self, value: int) -> None:
        pass  # SplitQueue's constructor sets it; the worker's position is not known here

    def _used_now(self) -> int:
        try:
            return U16.unpack_from(self._used, 2)[0]  # type: ignore[no-any-return]
        except ValueError:  # the session's memory was released: where the device stopped
            return self.used_idx

    def state(self) -> QueueState:
        used = self._used_now()
        return QueueState(used, used)


def _take_over(q: VirtQueue, link: _SupervisorLink) -> None:
    old = q.queue
    if isinstance(old, _HeldQueue) and old.link is not None:
        old.link.close()  # a previous worker's link (re-open after a restart)
    held = _HeldQueue(old.memory, old.layout, event_idx=old.event_idx, indirect=old.indirect,
                      state=old.state())
    held.link = link
    q.queue = held


def _doorbell_fd(bell: object) -> int | None:
    if not isinstance(bell, EventfdDoorbell):
        raise RemoteVirtioError(
            f"a queue doorbell is a {type(bell).__name__}, not an eventfd: only eventfd doorbells"
            " can be shared with a worker process")
    return bell.fd


def encode_queue_resources(resources: QueueResources) -> tuple[bytes, list[int]]:
    """The value and the descriptors that give a worker ``resources`` (module docstring).

    The descriptors stay the caller's (send them; they are closed with the resources' memory and
    doorbells, or when the supervisor's queues get another worker). From now on the supervisor's
    queues report the position a worker can be resumed at, and follow their doorbells for the
    worker. :class:`RemoteVirtioError` if the memory has an anonymous region, a doorbell is not
    an eventfd, or a queue has no kick fd.
    """
    try:
        regions, region_fds = resources.memory.share()
    except SharedMemoryError as exc:
        raise RemoteVirtioError(str(exc)) from None
    if len(regions) > MAX_REGIONS or len(resources.queues) > MAX_QUEUES:
        raise RemoteVirtioError(f"{len(regions)} memory regions and {len(resources.queues)}"
                                f" queues exceed {MAX_REGIONS} and {MAX_QUEUES}")
    parts = [_RESOURCES.pack(_RESOURCES_MAGIC, VERSION, len(regions), len(resources.queues), 0,
                             resources.features)]
    parts += [_REGION.pack(r.gpa, r.size, r.offset) for r in regions]
    fds = list(region_fds)
    inflight: list[bytes] = []
    for q in resources.queues:
        kick = _doorbell_fd(q.kick)
        if kick is None:
            raise RemoteVirtioError(f"queue {q.index} has no kick eventfd yet")
        call = _doorbell_fd(q.call)
        error = _doorbell_fd(q.error) if q.error is not None else None
        state = q.state()
        layout = q.queue.layout
        flags = (WHICH_CALL if call is not None else 0) | (WHICH_ERROR if error is not None else 0)
        parts.append(_QUEUE.pack(q.index, layout.size, flags, 0, layout.desc_gpa,
                                 layout.avail_gpa, layout.used_gpa, state.last_avail_idx & 0xFFFF,
                                 state.used_idx & 0xFFFF, len(state.inflight), 0))
        inflight.append(struct.pack(f"<{len(state.inflight)}H", *state.inflight))
        fds += [fd for fd in (kick, call, error) if fd is not None]
    link = _SupervisorLink()
    for i, q in enumerate(resources.queues):
        _take_over(q, link)
        for which, bell in ((WHICH_CALL, q.call), (WHICH_ERROR, q.error)):
            if isinstance(bell, EventfdDoorbell):
                link.follow(i, which, bell)
    assert link.page.fd is not None
    fds += [link.peer.fileno(), link.page.fd]
    return b"".join(parts + inflight), fds


class _WorkerLink:
    """The worker's end of an update link: applies the supervisor's doorbell updates before any
    call or error doorbell of the device rings once the generation moved."""

    def __init__(self, sock: socket.socket, page: GuestMemory) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.page = page
        self._generation = page.view(0, 8).cast("Q")
        self._seen = self._generation[0]
        self.queues: list[VirtQueue] = []

    def check(self) -> None:
        generation = self._generation[0]
        if generation == self._seen:
            return
        self._seen = generation
        latest: DoorbellState | None = None
        try:
            while True:
                try:
                    data, fds, flags, _ = socket.recv_fds(self.sock, 4096, _MAX_UPDATE_FDS)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    raise RemoteVirtioError(f"the supervisor's update link failed: {exc}"
                                            ) from None
                if flags & socket.MSG_CTRUNC:
                    _close_all(fds)
                    raise RemoteVirtioError("the supervisor's doorbell update lost descriptors")
                state = decode_doorbell_state_untrusted(data, fds)
                if latest is not None:
                    _close_all([fd for _, _, fd in latest.entries if fd is not None])
                latest = state
        except BaseException:
            if latest is not None:
                _close_all([fd for _, _, fd in latest.entries if fd is not None])
            raise
        if latest is not None:
            _apply_state(self.queues, latest)

    def close(self) -> None:
        self._generation.release()
        self.page.close()
        self.sock.close()


class _FollowingDoorbell(EventfdDoorbell):
    """A worker-side call or error doorbell: takes the supervisor's updates before it rings."""

    def __init__(self, fd: int | None, link: _WorkerLink) -> None:
        super().__init__(fd)
        self.link = link

    def ring(self) -> None:
        self.link.check()
        super().ring()


def decode_queue_resources_untrusted(
    data: bytes, fds: Sequence[int], *, allow_unsealed: bool = False
) -> QueueResources:
    """The worker's :class:`QueueResources` from the supervisor's value and descriptors.

    Takes ownership of ``fds``: they belong to the result (its memory's regions, its queues'
    doorbells, its update link; :func:`release_queue_resources` closes them all), or are all
    closed when :class:`RemoteVirtioError` is raised.
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
    if len(data) < expected:
        raise RemoteVirtioError(f"{what}: {len(data)} bytes, expected at least {expected}")
    regions = [
        SharedRegion(*_REGION.unpack_from(data, _RESOURCES.size + i * _REGION.size))
        for i in range(region_count)
    ]
    offset = _RESOURCES.size + region_count * _REGION.size
    queues = [_QUEUE.unpack_from(data, offset + i * _QUEUE.size) for i in range(queue_count)]
    fd_count = region_count + 2
    inflight: list[tuple[int, ...]] = []
    at = expected
    for i, (index, size, flags, zero_a, *_, count, zero_b) in enumerate(queues):
        if index != i:
            raise RemoteVirtioError(f"{what}: queue {i} says it is queue {index}")
        if flags & ~(WHICH_CALL | WHICH_ERROR) or zero_a or zero_b:
            raise RemoteVirtioError(f"{what}: queue {i} has unknown flags or reserved bits set")
        if not 1 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise RemoteVirtioError(f"{what}: queue {i} size {size} is not a power of two")
        if count > size or at + 2 * count > len(data):
            raise RemoteVirtioError(f"{what}: queue {i} has {count} chains in flight")
        inflight.append(struct.unpack_from(f"<{count}H", data, at))
        at += 2 * count
        fd_count += 1 + bool(flags & WHICH_CALL) + bool(flags & WHICH_ERROR)
    if at != len(data):
        raise RemoteVirtioError(f"{what}: {len(data)} bytes, expected {at}")
    if len(pending) != fd_count:
        raise RemoteVirtioError(f"{what}: {len(pending)} descriptors, the value needs {fd_count}")
    for k, fd in enumerate(pending[region_count:-2]):
        try:
            require_eventfd(fd, f"{what}: doorbell descriptor {k}")
        except FdKindError as exc:
            raise RemoteVirtioError(str(exc)) from None
    if fd_kind(pending[-2]) != "socket":
        raise RemoteVirtioError(f"{what}: the update link is a {fd_kind(pending[-2])}, not a"
                                " socket")
    try:
        page = GuestMemory.from_shared([SharedRegion(0, _PAGE_SIZE, 0)], pending[-1:],
                                       what=f"{what}: update page")
    except SharedMemoryError as exc:
        raise RemoteVirtioError(str(exc)) from None
    finally:
        del pending[-1:]  # from_shared owns or closed it
    link = _WorkerLink(socket.socket(fileno=pending.pop()), page)
    try:
        try:
            memory = GuestMemory.from_shared(regions, pending[:region_count],
                                             allow_unsealed=allow_unsealed, what=what)
        except SharedMemoryError as exc:
            raise RemoteVirtioError(str(exc)) from None
        finally:
            del pending[:region_count]  # from_shared owns or closed them
        try:
            resources = _build(memory, features, queues, inflight, pending, link, what)
        except BaseException:
            memory.close()
            raise
    except BaseException:
        link.close()
        raise
    link.queues = resources.queues
    return resources


def _build(memory: GuestMemory, features: int, queues: list[tuple[int, ...]],
           inflight: list[tuple[int, ...]], pending: list[int], link: _WorkerLink, what: str
           ) -> QueueResources:
    setups = []
    states = []
    errors: list[EventfdDoorbell] = []
    bells: list[EventfdDoorbell] = []
    try:
        for (index, size, flags, _, desc, avail, used, last_avail, used_idx, _, _), heads in zip(
                queues, inflight, strict=True):
            kick = EventfdDoorbell(pending.pop(0))
            bells.append(kick)
            call = _FollowingDoorbell(pending.pop(0) if flags & WHICH_CALL else None, link)
            bells.append(call)
            # An error doorbell even without an fd: the VMM may give one later (an update).
            error = _FollowingDoorbell(pending.pop(0) if flags & WHICH_ERROR else None, link)
            bells.append(error)
            errors.append(error)
            setups.append(QueueSetup(index, QueueLayout(size, desc, avail, used), kick, call))
            states.append(QueueState(last_avail, used_idx, heads))
        built = build_queues(memory, features, setups, states)
    except QueueError as exc:
        for bell in bells:
            bell.close()
        raise RemoteVirtioError(f"{what}: unusable queue: {exc}") from None
    except BaseException:
        for bell in bells:
            bell.close()
        raise
    for q, error_bell in zip(built, errors, strict=True):
        q.error = error_bell
    return QueueResources(built, features, memory)


def release_queue_resources(resources: QueueResources) -> None:
    """Close what :func:`decode_queue_resources_untrusted` made (the worker side, once the device
    that got ``resources`` is closed): every doorbell, the update link, the guest memory."""
    link: _WorkerLink | None = None
    for q in resources.queues:
        for bell in (q.kick, q.call, q.error):
            if isinstance(bell, _FollowingDoorbell):
                link = bell.link
            if isinstance(bell, EventfdDoorbell):
                bell.close()
    if link is not None:
        link.close()
    resources.memory.close()


# -- doorbell updates ------------------------------------------------------------------------------


@attrs.frozen
class DoorbellState:
    """The current call (:data:`WHICH_CALL`) and error (:data:`WHICH_ERROR`) doorbell fds of a
    device's queues: ``entries`` of (queue, which, fd or None: notifications that way are
    dropped)."""

    entries: tuple[tuple[int, int, int | None], ...]


def encode_doorbell_state(state: DoorbellState) -> tuple[bytes, list[int]]:
    parts = [_UPDATE.pack(_UPDATE_MAGIC, VERSION, len(state.entries))]
    parts += [_ENTRY.pack(q, w, int(fd is not None), 0) for q, w, fd in state.entries]
    return b"".join(parts), [fd for _, _, fd in state.entries if fd is not None]


def decode_doorbell_state_untrusted(data: bytes, fds: Sequence[int]) -> DoorbellState:
    """Takes ownership of ``fds`` (the state's, or closed on :class:`RemoteVirtioError`)."""
    try:
        what = "the supervisor's doorbell update"
        (_, _, count) = _check_header(data, _UPDATE, _UPDATE_MAGIC, what)
        if count > 2 * MAX_QUEUES or len(data) != _UPDATE.size + count * _ENTRY.size:
            raise RemoteVirtioError(f"{what}: {count} entries in {len(data)} bytes")
        entries = []
        pending = list(fds)
        for i in range(count):
            queue, which, has_fd, zero = _ENTRY.unpack_from(data, _UPDATE.size + i * _ENTRY.size)
            if which not in (WHICH_CALL, WHICH_ERROR) or has_fd not in (0, 1) or zero:
                raise RemoteVirtioError(f"{what}: entry {i} has doorbell {which}, fd flag"
                                        f" {has_fd}")
            fd = None
            if has_fd:
                if not pending:
                    raise RemoteVirtioError(f"{what}: fewer descriptors than entries with one")
                fd = pending.pop(0)
                try:
                    require_eventfd(fd, what)
                except FdKindError as exc:
                    raise RemoteVirtioError(str(exc)) from None
            entries.append((queue, which, fd))
        if pending:
            raise RemoteVirtioError(f"{what}: {len(pending)} descriptors more than entries")
        return DoorbellState(tuple(entries))
    except BaseException:
        _close_all(fds)
        raise


def _apply_state(queues: Sequence[VirtQueue], state: DoorbellState) -> None:
    """Set the worker's doorbells to ``state`` (owning its fds; the old ones are closed); every
    call doorbell is rung once (an interrupt raised on an old fd may have been lost)."""
    bells = []
    for queue, which, fd in state.entries:
        q = queues[queue] if 0 <= queue < len(queues) else None
        bell = None if q is None else q.call if which == WHICH_CALL else q.error
        if not isinstance(bell, EventfdDoorbell):  # a queue the device does not have
            _close_all([fd for _, _, fd in state.entries if fd is not None])
            raise RemoteVirtioError(f"the supervisor's doorbell update names queue {queue},"
                                    f" which the device does not have")
        bells.append((bell, which, fd))
    for bell, _, fd in bells:
        EventfdDoorbell.set_fd(bell, fd)
    for bell, which, _ in bells:
        if which == WHICH_CALL:
            EventfdDoorbell.ring(bell)


# -- the worker codecs -----------------------------------------------------------------------------

#: Descriptor kinds a queue resources value attaches (checked again by position when decoded).
_RESOURCE_FD_KINDS: Final = frozenset({"memfd", "regular", "eventfd", "socket"})


def _encode_traits_value(value: DeviceTraits, out: Encoder) -> Any:
    return {"wire": out.value(encode_traits(value))}


def _decode_traits_value(data: Any, inp: Decoder) -> DeviceTraits:
    wire = inp.value(inp.fields(data, "wire")["wire"])
    if not isinstance(wire, bytes):
        raise CodecError("DeviceTraits: the wire form is not bytes")
    try:
        return decode_traits_untrusted(wire)
    except RemoteVirtioError as exc:
        raise CodecError(str(exc)) from None


def _encode_resources_value(value: QueueResources, out: Encoder) -> Any:
    wire, fds = encode_queue_resources(value)
    _, region_fds = value.memory.share()
    # Memory the supervisor took unsealed was accepted by its operator ([host]
    # allow_unsealed_memory); the worker follows that decision.
    unsealed = not all(memfd_seals(fd) & F_SEAL_SHRINK for fd in region_fds)
    return {"wire": out.value(wire), "fds": [[out.fd(fd), fd_kind(fd)] for fd in fds],
            "unsealed": unsealed}


def _decode_resources_value(data: Any, inp: Decoder) -> QueueResources:
    fields = inp.fields(data, "wire", "fds", "unsealed")
    wire = inp.value(fields["wire"])
    rows, unsealed = fields["fds"], fields["unsealed"]
    if not isinstance(wire, bytes) or not isinstance(rows, list) or type(unsealed) is not bool:
        raise CodecError("QueueResources: expected wire bytes, a list of descriptors and a flag")
    if len(rows) > 2 * MAX_REGIONS + 3 * MAX_QUEUES + 2:
        raise CodecError(f"QueueResources: {len(rows)} descriptors")
    fds: list[int] = []
    try:
        for row in rows:
            if not (isinstance(row, list) and len(row) == 2 and row[1] in _RESOURCE_FD_KINDS):
                raise CodecError(f"QueueResources: a descriptor row {excerpt(row)}")
            fds.append(inp.fd(row[0], row[1]))
    except BaseException:
        _close_all(fds)
        raise
    try:
        return decode_queue_resources_untrusted(wire, fds, allow_unsealed=unsealed)
    except RemoteVirtioError as exc:
        raise CodecError(str(exc)) from None


register_codec(DeviceTraits, "devicehost.virtio.DeviceTraits", _encode_traits_value,
               _decode_traits_value)
register_codec(QueueResources, "devicehost.virtio.QueueResources", _encode_resources_value,
               _decode_resources_value, release=release_queue_resources)


def runs_in_worker(device: Device) -> bool:
    """Whether ``device``'s hooks run in a worker process (its plugin is the worker proxy)."""
    from devicehost.worker.proxy import WorkerProxy

    return isinstance(device.pm.get_plugin(device.name), WorkerProxy)

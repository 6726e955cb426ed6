"""VMBus devices in a worker process: the offer value and an open channel, across the seam.

A device with ``isolation = "process"`` runs its hooks in a worker process
(``docs/workers.md``). For a VMBus device two values cross the seam, each as a payload of bytes
plus file descriptors (the worker protocol carries both; ``devicehost.handoff``'s framing does
in the tests):

- **the offer** (worker -> supervisor): the :class:`~devicehost.vmbus.protocol.OfferParams` the
  device's ``offer`` hook returned, :func:`encode_offer` / :func:`decode_offer_untrusted`. No
  descriptors. The supervisor offers it on its VMBus server; the worker is untrusted here (a
  third-party device), so every field is checked.
- **the open channel** (supervisor -> worker): what the device's ``open`` hook receives,
  :class:`~devicehost.vmbus.protocol.OpenResources`. :func:`export_open_resources` turns the
  supervisor's resources into a payload and the descriptors to send with it;
  :func:`import_open_resources_untrusted` rebuilds them in the worker as an
  :class:`ImportedChannel` whose rings are the *same* guest pages: the worker maps the guest
  memory's memfds itself (:meth:`GuestMemory.share <devicehost.memory.GuestMemory.share>` /
  ``from_shared``), so no ring byte passes through the supervisor.

Signalling, both ways, as descriptors the worker holds (an :class:`EventfdSignal` over a *wait*
fd and a *notify* fd):

- A guest in another process (the VMBus socket) already signals the host over an eventfd
  (guest -> host) and is signalled through a pipe (host -> guest): the worker gets those two,
  so its interrupts reach the guest directly and the supervisor takes no part.
- The in-process guest signals through in-process events (which also tell it at once that the
  host closed the channel). :func:`bridge_signal` gives the channel two eventfds for the worker
  and a :class:`SignalBridge`, which the supervisor runs while the channel is open, forwarding
  each notification between them and the in-process signal.

Payload of the open channel (little-endian)::

    off  size  field
      0     2  version u16 (1)
      2     2  flags u16: bit0 target_vp present, bit1 use_confidential_ring,
               bit2 use_confidential_external_memory, bit3 is_external_memory_pinned,
               bit4 unsealed guest memory accepted by the operator
      4     2  region count u16 (1..MAX_REGIONS)
      6     2  event_flag u16
      8     4  ring page count u32 (2..MAX_RING_PAGES)
     12     4  ring_offset u32 (page index of the host -> guest ring in the ring pages)
     16     4  ring_gpadl_id u32
     20     4  target_vp u32
     24     4  connection_id u32
     28   120  open user data
    148        regions: count x (gpa u64, size u64, file offset u64)
               ring pages: count x pfn u64 (pages [0, ring_offset) the ring the device reads)

    descriptors: one memfd per region, in order; then the wait fd (an eventfd), then the notify
    fd (an eventfd, or the write end of a pipe).

Payload of the offer (little-endian)::

    off  size  field
      0     2  version u16 (1)
      2     1  channel kind u8 (0 device, 1 interface, 2 pipe, 3 hvsocket)
      3     1  flags u8: bit0 pipe_packets / message_mode / is_connect, bit1 is_for_container,
               bit2 allow_confidential_external_memory, bit3 latency present,
               bit4 offer_order present
      4    16  interface_id (GUID, wire layout)
     20    16  instance_id
     36     2  mmio_megabytes u16
     38     2  mmio_megabytes_optional u16
     40     2  subchannel_index u16
     42     2  interface_name length u16 (1..MAX_NAME bytes of UTF-8, after the fixed part)
     44     4  pipe_flags u32
     48     4  offer_order u32
     52     8  mnf_interrupt_latency f64 (seconds, 0..MAX_LATENCY)
     60    16  silo_id (GUID)
     76   120  user_defined (interface: 120 bytes; pipe: 112 then 8 zero bytes)
    196        interface_name

Every decoder raises :class:`RemoteVmbusError` (and only that) naming who is to blame. The
worker's descriptors are its own once imported: :meth:`ImportedChannel.close` closes the signal
and unmaps the memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import struct
from collections.abc import Sequence
from typing import Any, Final

import anyio
import attrs

from devicehost.context import DeviceContext
from devicehost.errors import DeviceHostError
from devicehost.fds import F_SEAL_SHRINK, FdKindError, fd_kind, memfd_seals, require_eventfd
from devicehost.memory import PAGE_SIZE, GuestMemory, SharedMemoryError, SharedRegion
from devicehost.vmbus.channel import ChannelClosed, EventfdSignal, RawChannel, Signal
from devicehost.vmbus.guid import Guid
from devicehost.vmbus.protocol import (
    PIPE_USER_DEFINED_SIZE,
    USER_DEFINED_SIZE,
    ChannelType,
    DeviceChannel,
    HvSocketChannel,
    InterfaceChannel,
    OfferParams,
    OpenData,
    OpenRequest,
    OpenResources,
    PipeChannel,
)
from devicehost.vmbus.ring import IncomingRing, OutgoingRing, RingError, RingMemory
from devicehost.worker.codec import CodecError, Decoder, Encoder
from devicehost.worker.proxy import Restart, register_failure_handler, register_restart_handler

__all__ = [
    "MAX_NAME",
    "MAX_REGIONS",
    "MAX_RING_PAGES",
    "REMOTE_VERSION",
    "ImportedChannel",
    "OpenWire",
    "RemoteVmbusError",
    "SignalBridge",
    "bridge_signal",
    "decode_offer_untrusted",
    "decode_offer_value",
    "decode_open_untrusted",
    "decode_open_value",
    "encode_offer",
    "encode_offer_value",
    "encode_open",
    "encode_open_value",
    "export_open_resources",
    "import_open_resources_untrusted",
    "release_open_value",
]

REMOTE_VERSION: Final = 1
#: Guest memory regions one open may name (the VMBus socket accepts fewer).
MAX_REGIONS: Final = 64
#: Pages a ring GPADL may have (a GPADL's range buffer holds at most 8191 u64 words).
MAX_RING_PAGES: Final = 8191
#: UTF-8 bytes of an offer's interface name.
MAX_NAME: Final = 256
#: Largest monitored-notification latency an offer may ask for, in seconds.
MAX_LATENCY: Final = 3600.0

_U32: Final = 0xFFFFFFFF

# Fixed part of the open payload (layout in the module docstring).
_OPEN: Final = struct.Struct("<HHHHIIIII120s")
_REGION: Final = struct.Struct("<QQQ")
_PFN: Final = struct.Struct("<Q")
_OPEN_TARGET_VP: Final = 1
_OPEN_CONF_RING: Final = 2
_OPEN_CONF_EXTERNAL: Final = 4
_OPEN_PINNED: Final = 8
_OPEN_UNSEALED: Final = 16
_OPEN_FLAGS: Final = 31

# Fixed part of the offer payload (layout in the module docstring).
_OFFER: Final = struct.Struct("<HBB16s16sHHHHIId16s120s")
_OFFER_BIT0: Final = 1
_OFFER_CONTAINER: Final = 2
_OFFER_CONF_EXTERNAL: Final = 4
_OFFER_LATENCY: Final = 8
_OFFER_ORDER: Final = 16
_OFFER_FLAGS: Final = 31
_KIND_DEVICE, _KIND_INTERFACE, _KIND_PIPE, _KIND_HVSOCKET = 0, 1, 2, 3


class RemoteVmbusError(DeviceHostError):
    """Raised when a VMBus value cannot cross the worker seam: a malformed payload or a wrong
    descriptor (the message names the side to blame), or resources that cannot be shared with
    another process (anonymous guest memory: the host's fault)."""


# -- the offer (worker -> supervisor) -------------------------------------------------------------


def encode_offer(params: OfferParams) -> bytes:
    """The payload of ``params`` (layout in the module docstring); RemoteVmbusError if a field
    cannot be carried (a name too long, an offer order beyond u32)."""
    kind, bit0, container, pipe_flags = _KIND_DEVICE, False, False, 0
    silo, user = Guid.ZERO, bytes(USER_DEFINED_SIZE)
    channel = params.channel_type
    if isinstance(channel, DeviceChannel):
        bit0 = channel.pipe_packets
    elif isinstance(channel, InterfaceChannel):
        kind, user = _KIND_INTERFACE, channel.user_defined
    elif isinstance(channel, PipeChannel):
        kind, bit0, pipe_flags = _KIND_PIPE, channel.message_mode, channel.pipe_flags
        user = channel.user_defined.ljust(USER_DEFINED_SIZE, b"\0")
    else:
        assert isinstance(channel, HvSocketChannel)
        kind, bit0, container, silo = (_KIND_HVSOCKET, channel.is_connect,
                                       channel.is_for_container, channel.silo_id)
    try:
        name = params.interface_name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RemoteVmbusError(f"the offer's interface name is not UTF-8: {exc}") from None
    if not 0 < len(name) <= MAX_NAME:
        raise RemoteVmbusError(f"the offer's interface name has {len(name)} bytes of UTF-8;"
                               f" 1..{MAX_NAME} can be carried")
    order = params.offer_order
    latency = params.mnf_interrupt_latency
    if order is not None and not 0 <= order <= _U32:
        raise RemoteVmbusError(f"the offer's offer_order {order} is not a u32")
    if latency is not None and not (math.isfinite(latency) and 0 <= latency <= MAX_LATENCY):
        raise RemoteVmbusError(f"the offer's mnf_interrupt_latency {latency} is not"
                               f" 0..{MAX_LATENCY} seconds")
    if not 0 <= pipe_flags <= _U32:
        raise RemoteVmbusError(f"the offer's pipe_flags {pipe_flags} is not a u32")
    flags = ((_OFFER_BIT0 if bit0 else 0) | (_OFFER_CONTAINER if container else 0)
             | (_OFFER_CONF_EXTERNAL if params.allow_confidential_external_memory else 0)
             | (_OFFER_LATENCY if latency is not None else 0)
             | (_OFFER_ORDER if order is not None else 0))
    fixed = _OFFER.pack(REMOTE_VERSION, kind, flags, bytes(params.interface_id),
                        bytes(params.instance_id), params.mmio_megabytes,
                        params.mmio_megabytes_optional, params.subchannel_index, len(name),
                        pipe_flags, order or 0, latency or 0.0, bytes(silo), user)
    return fixed + name


def decode_offer_untrusted(data: bytes) -> OfferParams:
    """The offer a worker sent; :class:`RemoteVmbusError` blaming the worker if it is
    malformed."""
    if len(data) < _OFFER.size:
        raise RemoteVmbusError(f"the worker's VMBus offer has {len(data)} bytes, fewer than its"
                               f" fixed {_OFFER.size}")
    (version, kind, flags, interface_id, instance_id, mmio, mmio_optional, subchannel,
     name_len, pipe_flags, order, latency, silo, user) = _OFFER.unpack_from(data)
    if version != REMOTE_VERSION:
        raise RemoteVmbusError(f"the worker's VMBus offer is version {version}, not"
                               f" {REMOTE_VERSION}")
    if flags & ~_OFFER_FLAGS:
        raise RemoteVmbusError(f"the worker's VMBus offer sets unknown flags {flags:#x}")
    if not 0 < name_len <= MAX_NAME or len(data) != _OFFER.size + name_len:
        raise RemoteVmbusError(f"the worker's VMBus offer announces a {name_len}-byte name in"
                               f" {len(data) - _OFFER.size} bytes (1..{MAX_NAME})")
    try:
        name = data[_OFFER.size:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RemoteVmbusError(f"the worker's VMBus offer name is not UTF-8: {exc}") from None
    bit0 = bool(flags & _OFFER_BIT0)
    container = bool(flags & _OFFER_CONTAINER)
    if container and kind != _KIND_HVSOCKET:
        raise RemoteVmbusError("the worker's VMBus offer sets is_for_container on a channel"
                               " that is not an hvsocket")
    channel: ChannelType
    if kind == _KIND_DEVICE:
        channel = DeviceChannel(pipe_packets=bit0)
    elif kind == _KIND_INTERFACE:
        channel = InterfaceChannel(user_defined=user)
    elif kind == _KIND_PIPE:
        if any(user[PIPE_USER_DEFINED_SIZE:]):
            raise RemoteVmbusError("the worker's VMBus pipe offer has user data past its 112"
                                   " bytes")
        channel = PipeChannel(message_mode=bit0, user_defined=user[:PIPE_USER_DEFINED_SIZE],
                              pipe_flags=pipe_flags)
    elif kind == _KIND_HVSOCKET:
        channel = HvSocketChannel(is_connect=bit0, is_for_container=container,
                                  silo_id=Guid(silo))
    else:
        raise RemoteVmbusError(f"the worker's VMBus offer has unknown channel kind {kind}")
    if kind != _KIND_PIPE and pipe_flags:
        raise RemoteVmbusError("the worker's VMBus offer sets pipe_flags on a channel that is"
                               " not a pipe")
    if flags & _OFFER_LATENCY:
        if not (math.isfinite(latency) and 0 <= latency <= MAX_LATENCY):
            raise RemoteVmbusError(f"the worker's VMBus offer latency {latency!r} is not"
                                   f" 0..{MAX_LATENCY} seconds")
    elif latency != 0.0:
        raise RemoteVmbusError("the worker's VMBus offer fills a latency it says is absent")
    if order and not flags & _OFFER_ORDER:
        raise RemoteVmbusError("the worker's VMBus offer fills an offer order it says is absent")
    return OfferParams(
        interface_name=name, instance_id=Guid(instance_id), interface_id=Guid(interface_id),
        mmio_megabytes=mmio, mmio_megabytes_optional=mmio_optional, channel_type=channel,
        subchannel_index=subchannel,
        mnf_interrupt_latency=latency if flags & _OFFER_LATENCY else None,
        offer_order=order if flags & _OFFER_ORDER else None,
        allow_confidential_external_memory=bool(flags & _OFFER_CONF_EXTERNAL),
    )


# -- the open channel (supervisor -> worker) ------------------------------------------------------


@attrs.frozen
class OpenWire:
    """The payload of an open channel: the guest memory layout, the ring GPADL's pages and where
    they split, the open request, and whether the operator accepted unsealed guest memory."""

    regions: tuple[SharedRegion, ...]
    ring_pfns: tuple[int, ...]
    request: OpenRequest
    unsealed_ok: bool = False


def encode_open(wire: OpenWire) -> bytes:
    """The payload of ``wire`` (layout in the module docstring)."""
    data = wire.request.open_data
    flags = ((_OPEN_TARGET_VP if data.target_vp is not None else 0)
             | (_OPEN_CONF_RING if wire.request.use_confidential_ring else 0)
             | (_OPEN_CONF_EXTERNAL if wire.request.use_confidential_external_memory else 0)
             | (_OPEN_PINNED if wire.request.is_external_memory_pinned else 0)
             | (_OPEN_UNSEALED if wire.unsealed_ok else 0))
    parts = [_OPEN.pack(REMOTE_VERSION, flags, len(wire.regions), data.event_flag,
                        len(wire.ring_pfns), data.ring_offset, data.ring_gpadl_id,
                        data.target_vp or 0, data.connection_id, data.user_data)]
    parts += [_REGION.pack(r.gpa, r.size, r.offset) for r in wire.regions]
    parts += [_PFN.pack(pfn) for pfn in wire.ring_pfns]
    return b"".join(parts)


def decode_open_untrusted(data: bytes) -> OpenWire:
    """An open channel's payload; :class:`RemoteVmbusError` blaming the supervisor if it is
    malformed (the descriptors are checked by :func:`import_open_resources_untrusted`)."""
    if len(data) < _OPEN.size:
        raise RemoteVmbusError(f"the supervisor's open channel has {len(data)} bytes, fewer than"
                               f" its fixed {_OPEN.size}")
    (version, flags, nregions, event_flag, npages, ring_offset, gpadl_id, target_vp,
     connection_id, user_data) = _OPEN.unpack_from(data)
    if version != REMOTE_VERSION:
        raise RemoteVmbusError(f"the supervisor's open channel is version {version}, not"
                               f" {REMOTE_VERSION}")
    if flags & ~_OPEN_FLAGS:
        raise RemoteVmbusError(f"the supervisor's open channel sets unknown flags {flags:#x}")
    if not 1 <= nregions <= MAX_REGIONS or not 2 <= npages <= MAX_RING_PAGES:
        raise RemoteVmbusError(f"the supervisor's open channel names {nregions} regions and"
                               f" {npages} ring pages (1..{MAX_REGIONS}, 2..{MAX_RING_PAGES})")
    if len(data) != _OPEN.size + nregions * _REGION.size + npages * _PFN.size:
        raise RemoteVmbusError(f"the supervisor's open channel has {len(data)} bytes, not what"
                               f" {nregions} regions and {npages} ring pages take")
    if not 0 < ring_offset < npages:
        raise RemoteVmbusError(f"the supervisor's ring offset {ring_offset} is outside the"
                               f" ring's {npages} pages")
    if not flags & _OPEN_TARGET_VP and target_vp:
        raise RemoteVmbusError("the supervisor's open channel fills target_vp it says is absent")
    regions = []
    at = _OPEN.size
    for _ in range(nregions):
        gpa, size, offset = _REGION.unpack_from(data, at)
        at += _REGION.size
        if size == 0 or (gpa | size | offset) % PAGE_SIZE or gpa + size > 1 << 64:
            raise RemoteVmbusError(f"the supervisor's region {gpa:#x}+{size:#x} (file offset"
                                   f" {offset:#x}) is not whole pages inside 2**64")
        regions.append(SharedRegion(gpa, size, offset))
    pfns = tuple(pfn for (pfn,) in _PFN.iter_unpack(data[at:]))
    request = OpenRequest(
        OpenData(ring_offset=ring_offset, ring_gpadl_id=gpadl_id,
                 target_vp=target_vp if flags & _OPEN_TARGET_VP else None,
                 event_flag=event_flag, connection_id=connection_id, user_data=user_data),
        use_confidential_ring=bool(flags & _OPEN_CONF_RING),
        use_confidential_external_memory=bool(flags & _OPEN_CONF_EXTERNAL),
        is_external_memory_pinned=bool(flags & _OPEN_PINNED),
    )
    return OpenWire(tuple(regions), pfns, request, unsealed_ok=bool(flags & _OPEN_UNSEALED))


class SignalBridge:
    """The supervisor's relay between an in-process channel signal and a worker's eventfds.

    Made by :func:`bridge_signal`. ``run`` forwards every guest notification to the worker and
    every worker notification to the guest until the channel closes (the in-process signal
    raising :class:`ChannelClosed`) or it is cancelled; then it closes its eventfds.
    """

    def __init__(self, guest_side: Signal, worker_side: EventfdSignal) -> None:
        self.guest_side = guest_side
        self.worker_side = worker_side
        self._scope: anyio.CancelScope | None = None
        self._closed = False

    async def run(self) -> None:
        if self._closed:
            return
        try:
            with anyio.CancelScope() as self._scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._forward, self.guest_side, self.worker_side,
                                  tg.cancel_scope)
                    tg.start_soon(self._forward, self.worker_side, self.guest_side,
                                  tg.cancel_scope)
        finally:
            self.close()

    @staticmethod
    async def _forward(source: Signal, sink: Signal, scope: anyio.CancelScope) -> None:
        try:
            while True:
                await source.wait()
                sink.notify_remote()
        except ChannelClosed:
            scope.cancel()

    def close(self) -> None:
        """End :meth:`run` (if it runs) and close the supervisor's ends of the eventfds (the
        worker keeps its copies)."""
        self._closed = True
        if self._scope is not None:
            self._scope.cancel()
        self.worker_side.close()


def bridge_signal(resources: OpenResources) -> tuple[OpenResources, SignalBridge]:
    """Resources like ``resources`` whose channel signals through two new eventfds (what
    :func:`export_open_resources` hands a worker), and the :class:`SignalBridge` that joins
    those eventfds to the original (in-process) signal. The caller runs the bridge while the
    channel is open; it ends when the original signal closes."""
    worker_wait, worker_notify = EventfdSignal.new_fds()
    os.set_inheritable(worker_wait, False)  # no other child may inherit them
    os.set_inheritable(worker_notify, False)
    channel = resources.channel
    bridge = SignalBridge(channel.signal, EventfdSignal(worker_notify, worker_wait,
                                                        owns_fds=True))
    worker_end = EventfdSignal(worker_wait, worker_notify)  # the bridge owns the fds
    bridged = RawChannel(channel.incoming, channel.outgoing, worker_end)
    return OpenResources(bridged, resources.memory, resources.request), bridge


def export_open_resources(resources: OpenResources, *, unsealed_ok: bool = False
                          ) -> tuple[bytes, list[tuple[int, str]]]:
    """The payload and descriptors (fd, kind) that carry ``resources`` to a worker.

    The descriptors are the resources' own (guest memory's memfds and the channel signal's wait
    and notify fds): they stay open while the channel is, so send them, never close them. The
    channel must signal through an :class:`EventfdSignal`: a guest in another process (the VMBus
    socket) does, and the in-process guest's signal is bridged first (:func:`bridge_signal`).

    :class:`RemoteVmbusError` if they cannot be shared: guest memory that is not memfd-backed,
    rings that are not guest pages, an in-process signal. ``unsealed_ok``: the operator accepted
    unsealed guest memory (``[host] allow_unsealed_memory``), which the worker then accepts too.
    """
    channel = resources.channel
    incoming, outgoing = channel.incoming.mem.pfns, channel.outgoing.mem.pfns
    if incoming is None or outgoing is None:
        raise RemoteVmbusError("the channel's rings are not guest pages; a worker cannot map"
                               " them")
    signal = channel.signal
    if not isinstance(signal, EventfdSignal):
        raise RemoteVmbusError(f"the channel signals through a {type(signal).__name__}; a"
                               " worker needs eventfds (bridge it with bridge_signal)")
    try:
        regions, memory_fds = resources.memory.share()
    except SharedMemoryError as exc:
        raise RemoteVmbusError(f"a device in a worker needs guest memory backed by memfds"
                               f" (the host's own memory is): {exc}") from None
    if not regions or len(regions) > MAX_REGIONS:
        raise RemoteVmbusError(f"guest memory has {len(regions)} regions; a worker takes"
                               f" 1..{MAX_REGIONS}")
    wire = OpenWire(regions, incoming + outgoing, resources.request, unsealed_ok=unsealed_ok)
    fds = [(fd, fd_kind(fd)) for fd in memory_fds]
    fds += [(signal.wait_fd, "eventfd"), (signal.notify_fd, fd_kind(signal.notify_fd))]
    return encode_open(wire), fds


class ImportedChannel:
    """An open channel in the worker: the device's resources over the mapped guest memory, and
    what closing them releases (the signal's descriptors and the mapping)."""

    def __init__(self, resources: OpenResources) -> None:
        self.resources = resources

    def close(self) -> None:
        """Close the channel's signal and unmap the guest memory (views still held read zeros,
        ``devicehost.memory``)."""
        self.resources.channel.close()
        self.resources.memory.close()


def _require_notify(fd: int) -> None:
    kind = fd_kind(fd)
    if kind == "eventfd":
        return
    if kind == "fifo" and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY:
        return
    raise FdKindError(f"the notify descriptor is a {kind}, not an eventfd or a pipe's write end")


def import_open_resources_untrusted(payload: bytes, fds: Sequence[int]) -> ImportedChannel:
    """Rebuild an open channel in the worker from :func:`export_open_resources`' payload and
    descriptors, which become the channel's (all of them are closed on an error).

    :class:`RemoteVmbusError` blaming the supervisor for a malformed payload, a descriptor of the
    wrong kind or count, guest memory that is unsealed (unless the operator accepted it) or
    smaller than a region, and rings outside guest memory or of an invalid size.
    """
    owned = list(fds)
    memory: GuestMemory | None = None
    try:
        wire = decode_open_untrusted(payload)
        if len(owned) != len(wire.regions) + 2:
            raise RemoteVmbusError(f"the supervisor sent {len(owned)} descriptors for"
                                   f" {len(wire.regions)} regions and a signal pair")
        count = len(wire.regions)
        memory_fds, owned = owned[:count], owned[count:]
        memory = GuestMemory.from_shared(wire.regions, memory_fds,
                                         allow_unsealed=wire.unsealed_ok,
                                         what="guest memory from the supervisor")
        wait_fd, notify_fd = owned
        require_eventfd(wait_fd, "the channel's wait descriptor from the supervisor")
        _require_notify(notify_fd)
        split = wire.request.open_data.ring_offset
        incoming = IncomingRing(RingMemory.from_pages(memory, wire.ring_pfns[:split]))
        outgoing = OutgoingRing(RingMemory.from_pages(memory, wire.ring_pfns[split:]))
    except BaseException as exc:
        for fd in owned:
            with contextlib.suppress(OSError):
                os.close(fd)
        if memory is not None:
            memory.close()
        if isinstance(exc, (FdKindError, RingError, ValueError, OverflowError, OSError)):
            raise RemoteVmbusError(f"the supervisor's open channel cannot be used: {exc}"
                                   ) from None
        raise
    signal = EventfdSignal(wait_fd, notify_fd, owns_fds=True)
    channel = RawChannel(incoming, outgoing, signal)
    return ImportedChannel(OpenResources(channel, memory, wire.request))


# -- the worker's codec registry and restart ----------------------------------------------------
#
# devicehost.worker.codec registers OfferParams and OpenResources with the functions below
# (imported at first use); the restart handler is registered when this module is imported, which
# the supervisor does at the first open it sends to a worker.

#: Descriptor kinds a guest memory region may arrive as (a regular file only where the operator
#: accepted unsealed memory; GuestMemory.from_shared checks the seals).
_MEMORY_KINDS: Final = frozenset({"memfd", "regular"})
_NOTIFY_KINDS: Final = frozenset({"eventfd", "fifo"})


def encode_offer_value(value: OfferParams, out: Encoder) -> Any:
    """The codec form of an offer (a worker's answer to ``offer``)."""
    try:
        return {"wire": out.value(encode_offer(value))}
    except RemoteVmbusError as exc:
        raise CodecError(str(exc)) from exc


def decode_offer_value(data: Any, inp: Decoder) -> OfferParams:
    """An offer a worker sent (hostile); CodecError."""
    raw = inp.value(inp.fields(data, "wire")["wire"])
    if not isinstance(raw, bytes):
        raise CodecError("OfferParams: the wire form is not bytes")
    try:
        return decode_offer_untrusted(raw)
    except RemoteVmbusError as exc:
        raise CodecError(str(exc)) from exc


def encode_open_value(value: OpenResources, out: Encoder) -> Any:
    """The codec form of an open channel (the supervisor's ``open`` argument): the payload and
    the resources' own descriptors, which stay open while the channel is."""
    try:
        unsealed = any(not memfd_seals(fd) & F_SEAL_SHRINK
                       for fd in (region.fd for region in value.memory.regions)
                       if fd is not None)
        payload, fds = export_open_resources(value, unsealed_ok=unsealed)
    except RemoteVmbusError as exc:
        raise CodecError(str(exc)) from exc
    return {"wire": out.value(payload), "fds": [[out.fd(fd), kind] for fd, kind in fds]}


def decode_open_value(data: Any, inp: Decoder) -> OpenResources:
    """An open channel in the worker; CodecError (every descriptor closed)."""
    fields = inp.fields(data, "wire", "fds")
    raw, rows = inp.value(fields["wire"]), fields["fds"]
    if not isinstance(raw, bytes) or not isinstance(rows, list) or len(rows) < 3:
        raise CodecError("OpenResources: expected a wire payload and at least 3 descriptors")
    fds: list[int] = []
    try:
        for position, row in enumerate(rows):
            last = position == len(rows) - 1
            allowed = (_NOTIFY_KINDS if last else {"eventfd"} if position == len(rows) - 2
                       else _MEMORY_KINDS)
            if not (isinstance(row, list) and len(row) == 2 and row[1] in allowed):
                raise CodecError(f"OpenResources: descriptor row {position} is not"
                                 f" [index, one of {sorted(allowed)}]")
            fds.append(inp.fd(row[0], row[1]))
    except BaseException:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise
    try:
        return import_open_resources_untrusted(raw, fds).resources
    except RemoteVmbusError as exc:
        raise CodecError(str(exc)) from exc


def release_open_value(value: OpenResources) -> None:
    """Release an open channel a worker decoded: its signal's descriptors and its mapping of
    guest memory (:meth:`ImportedChannel.close`)."""
    ImportedChannel(value).close()


async def _restart(restart: Restart) -> bool:
    """A VMBus device's worker died while its channel was open: the supervisor revokes the
    offer (closing the channel and dropping its GPADLs) and offers the device anew, in a task of
    its own (the revoke stops this very run); the guest sees a rescind and a new offer and opens
    again, in the new worker."""
    reoffer = getattr(_transport(restart.ctx), "reoffer", None)
    if reoffer is None:
        return False  # not served by a host's VMBus transport: the run fails as without a handler
    restart.ctx.host.task_group.start_soon(reoffer, restart.ctx.name)
    return True


def _failed(ctx: DeviceContext, cause: str) -> None:
    """A VMBus device's worker died for good while its channel was open: the supervisor
    revokes the offer (the guest's channel closes instead of waiting on a device that is gone);
    the device stays FAILED."""
    revoke = getattr(_transport(ctx), "revoke_failed", None)
    if revoke is not None:
        ctx.host.task_group.start_soon(revoke, ctx.name, cause)


def _transport(ctx: DeviceContext) -> Any:
    """The transport serving the device of ``ctx`` in its host, or None."""
    transport_of = getattr(ctx.host, "transport_of", None)
    try:
        return None if transport_of is None else transport_of(ctx.name)
    except KeyError:
        return None


register_restart_handler(OpenResources, _restart)
register_failure_handler(OpenResources, _failed)

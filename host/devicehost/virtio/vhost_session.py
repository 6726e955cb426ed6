"""The sans-I/O protocol state of one vhost-user front-end connection.

:class:`BackendSession` takes decoded messages (with their file descriptors), keeps the negotiated
features, the memory table (memfds mapped into a :class:`GuestMemory` at their guest addresses,
plus the VMM-virtual-address map that SET_VRING_ADDR is translated through) and the vrings, and
returns the reply bytes. It does no I/O: :class:`devicehost.virtio.vhost_user.VhostUserBackend`
reads the socket, applies each message here and maps the session onto the device lifecycle. The
rules it enforces on the front-end (fd kinds, sealed memory, sizes) are listed in that module's
docstring.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, Final

import attrs

from devicehost.fds import (
    F_SEAL_SHRINK,
    FdKindError,
    memfd_seals,
    require_eventfd,
    require_unshrinkable_memory,
)
from devicehost.memory import GuestMemory, GuestMemoryError, MemoryRegion
from devicehost.virtio.doorbell import EventfdDoorbell
from devicehost.virtio.driver import QueueSetup
from devicehost.virtio.queue import MAX_QUEUE_SIZE, U16, QueueError, QueueLayout, QueueState
from devicehost.virtio.traits import DeviceTraits, offered_features
from devicehost.virtio.transport import (
    QueueResources,
    VirtQueue,
    build_queues,
)
from devicehost.virtio.vhost_message import (
    F_REPLY,
    F_VERSION,
    HEADER,
    PROTOCOL_F_CONFIG,
    PROTOCOL_F_MQ,
    PROTOCOL_F_REPLY_ACK,
    USER_F_PROTOCOL_FEATURES,
    ConfigPayload,
    Header,
    MemRegion,
    Request,
    VhostUserError,
    VringState,
    decode_config_untrusted,
    decode_mem_table_untrusted,
    decode_u64_untrusted,
    decode_vring_addr_untrusted,
    decode_vring_state_untrusted,
    encode_config,
    encode_u64,
    encode_vring_state,
    vring_file_index,
)

__all__ = ["PROTOCOL_FEATURES", "BackendSession", "Vring"]

log = logging.getLogger("devicehost.virtio.vhost_user")

#: Protocol features offered: MQ (GET_QUEUE_NUM), REPLY_ACK, CONFIG (GET/SET_CONFIG).
PROTOCOL_FEATURES: Final = (1 << PROTOCOL_F_MQ) | (1 << PROTOCOL_F_REPLY_ACK) | (
    1 << PROTOCOL_F_CONFIG
)
_HAS_REPLY: Final = frozenset({
    Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_VRING_BASE,
    Request.GET_QUEUE_NUM, Request.GET_CONFIG,
})

@attrs.define
class Vring:
    """One vring as the front-end set it up (and, while the device is open, its queue)."""

    num: int = 0
    desc: int | None = None
    avail: int | None = None
    used: int | None = None
    base: int = 0
    enabled: bool = False
    started: bool = False
    kick: EventfdDoorbell = attrs.field(factory=EventfdDoorbell)
    call: EventfdDoorbell = attrs.field(factory=EventfdDoorbell)
    err: EventfdDoorbell = attrs.field(factory=EventfdDoorbell)
    queue: VirtQueue | None = None

    def close(self) -> None:
        self.kick.close()
        self.call.close()
        self.err.close()


class BackendSession:
    """The protocol state of one frontend connection (no I/O).

    ``allow_unsealed`` accepts guest memory without ``F_SEAL_SHRINK`` (a warning per region on
    ``logger``); see the module docstring.
    """

    def __init__(
        self,
        traits: DeviceTraits,
        config_read: Callable[[int, int], bytes],
        config_write: Callable[[int, bytes], None],
        *,
        allow_unsealed: bool = False,
        logger: logging.Logger | logging.LoggerAdapter[Any] = log,
    ) -> None:
        self.traits = traits
        self.allow_unsealed = allow_unsealed
        self.logger = logger
        self._config_read = config_read
        self._config_write = config_write
        self.features = 0
        self.protocol_features = 0
        self.owner = False
        self.memory: GuestMemory | None = None
        self._user_map: list[tuple[int, int, int]] = []  # (user address, size, guest address)
        self.vrings = [Vring() for _ in range(traits.queue_count)]
        self.received: list[int] = []  # request codes, in order (diagnostics and tests)

    @property
    def offered_features(self) -> int:
        return offered_features(self.traits) | 1 << USER_F_PROTOCOL_FEATURES

    @property
    def virtio_features(self) -> int:
        """The negotiated virtio features (without the vhost-user protocol bit)."""
        return self.features & ~(1 << USER_F_PROTOCOL_FEATURES)

    def close(self) -> None:
        for vring in self.vrings:
            vring.close()
            vring.queue = None
        self._set_memory(None, [])

    # -- queues ------------------------------------------------------------------------------------

    def ready(self) -> bool:
        """True when the device can be opened: memory mapped and every vring started."""
        return self.memory is not None and all(
            v.started and v.num and v.desc is not None for v in self.vrings
        )

    def all_enabled(self) -> bool:
        return all(v.enabled for v in self.vrings)

    def start_queues(self, restored: Sequence[QueueState] | None = None) -> QueueResources:
        """Build the device's queues from the vrings (VhostUserError if they are unusable);
        ``restored``: each queue's saved position (a handover) instead of the vring's base."""
        memory = self.memory
        assert memory is not None
        setups = []
        states = []
        for i, v in enumerate(self.vrings):
            assert v.desc is not None and v.avail is not None and v.used is not None
            layout = QueueLayout(v.num, v.desc, v.avail, v.used)
            try:
                used_idx = U16.unpack(memory.read(v.used + 2, 2))[0]
            except GuestMemoryError as exc:
                raise VhostUserError(
                    f"vring {i} used ring is outside guest memory: {exc}"
                ) from None
            setups.append(QueueSetup(i, layout, v.kick, v.call))
            states.append(QueueState(v.base, used_idx) if restored is None else restored[i])
        try:
            queues = build_queues(memory, self.virtio_features, setups, states)
        except QueueError as exc:
            raise VhostUserError(f"the VMM's vrings are unusable: {exc}") from None
        for v, q in zip(self.vrings, queues, strict=True):
            v.queue = q
            q.error = v.err
        return QueueResources(queues, self.virtio_features, memory)

    def stop_queues(self) -> None:
        """The device closed: remember where each queue stopped."""
        for v in self.vrings:
            if v.queue is not None:
                v.base = v.queue.queue.last_avail_idx
                v.queue = None

    # -- memory ------------------------------------------------------------------------------------

    @property
    def user_map(self) -> tuple[tuple[int, int, int], ...]:
        """(VMM virtual address, size, guest address) of each region of the memory table."""
        return tuple(self._user_map)

    def adopt_memory(self, memory: GuestMemory, user_map: list[tuple[int, int, int]]) -> None:
        """Use ``memory`` (mapped from a handed-over memory table) and its VMM address map."""
        self._set_memory(memory, user_map)

    def _set_memory(self, memory: GuestMemory | None, user_map: list[tuple[int, int, int]]) -> None:
        if self.memory is not None:
            self.memory.close()
        self.memory = memory
        self._user_map = user_map

    def translate(self, user_addr: int, what: str) -> int:
        """The guest address of a VMM virtual address (SET_VRING_ADDR)."""
        for start, size, gpa in self._user_map:
            if start <= user_addr < start + size:
                return gpa + (user_addr - start)
        raise VhostUserError(f"{what} address {user_addr:#x} is in no region of the memory table")

    def _check_backing(self, index: int, r: MemRegion, fd: int) -> None:
        # Touching a mapped page past the end of its file raises SIGBUS and kills the host: the
        # file must be one that cannot shrink (sealed), and the region must lie inside it. The
        # seals are read first: once F_SEAL_SHRINK is seen, the size read after it only grows.
        what = f"SET_MEM_TABLE region {index} (guest address {r.guest_addr:#x})"
        try:
            require_unshrinkable_memory(fd, what, allow_unsealed=self.allow_unsealed)
        except FdKindError as exc:
            raise VhostUserError(str(exc)) from None
        if not memfd_seals(fd) & F_SEAL_SHRINK:
            self.logger.warning(
                "%s: guest memory is not sealed against shrinking; accepted because [host]"
                " allow_unsealed_memory is set (the VMM can kill this process with SIGBUS)", what
            )
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise VhostUserError(f"{what}: the fd is unusable: {exc}") from None
        if st.st_size < r.mmap_offset + r.size:
            raise VhostUserError(f"{what} reaches beyond the end of its {st.st_size}-byte file")

    def _mem_table(self, regions: tuple[MemRegion, ...], fds: list[int]) -> None:
        if len(fds) != len(regions):
            raise VhostUserError(
                f"SET_MEM_TABLE has {len(regions)} regions but {len(fds)} file descriptors"
            )
        pending = list(fds)  # fds not yet owned by a mapped region
        fds.clear()
        memory = GuestMemory()
        try:
            for index, (r, fd) in enumerate(zip(regions, list(pending), strict=True)):
                self._check_backing(index, r, fd)
                try:
                    region = MemoryRegion(r.guest_addr, r.size, fd=fd, offset=r.mmap_offset,
                                          owns_fd=True)
                except (OSError, ValueError, OverflowError) as exc:
                    raise VhostUserError(
                        f"SET_MEM_TABLE region {r} cannot be mapped: {exc}"
                    ) from None
                pending.remove(fd)
                try:
                    memory.add_region(region)
                except ValueError as exc:
                    region.close()
                    raise VhostUserError(f"SET_MEM_TABLE regions overlap: {exc}") from None
        except BaseException:
            memory.close()
            for fd in pending:
                os.close(fd)
            raise
        self._set_memory(memory, [(r.user_addr, r.size, r.guest_addr) for r in regions])

    # -- messages ----------------------------------------------------------------------------------

    def handle(self, header: Header, payload: bytes, fds: list[int]) -> bytes | None:
        """Apply one message; returns the reply (header included) or None.

        Takes ownership of ``fds``: those the message uses are kept, the rest are closed.
        """
        try:
            try:
                request = Request(header.request)
            except ValueError:
                raise VhostUserError(f"unsupported request {header.request}") from None
            self.received.append(request)
            body = self._dispatch(request, payload, fds)
            if fds:
                raise VhostUserError(f"{request.name} carried {len(fds)} unexpected fds")
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            fds.clear()
        if request in _HAS_REPLY:
            assert body is not None
            return HEADER.pack(request, F_VERSION | F_REPLY, len(body)) + body
        if header.need_reply and self.protocol_features >> PROTOCOL_F_REPLY_ACK & 1:
            return HEADER.pack(request, F_VERSION | F_REPLY, 8) + encode_u64(0)
        return None

    def _vring(self, index: int, what: str) -> Vring:
        if index >= len(self.vrings):
            raise VhostUserError(f"{what} names vring {index}; the device has {len(self.vrings)}")
        return self.vrings[index]

    def _take_fd(self, payload: bytes, fds: list[int], what: str) -> tuple[int, int | None]:
        value = decode_u64_untrusted(payload, what)
        index, has_fd = vring_file_index(value, len(self.vrings), what)
        if not has_fd:
            return index, None
        if len(fds) != 1:
            raise VhostUserError(f"{what} for vring {index} carried {len(fds)} fds, not 1")
        try:
            require_eventfd(fds[0], f"{what} for vring {index}")
        except FdKindError as exc:  # the fd stays in fds: handle() closes it
            raise VhostUserError(str(exc)) from None
        return index, fds.pop()

    def _dispatch(self, request: Request, payload: bytes, fds: list[int]) -> bytes | None:
        name = request.name
        no_payload = (Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_QUEUE_NUM,
                      Request.SET_OWNER, Request.RESET_OWNER)
        if request in no_payload and payload:
            raise VhostUserError(f"{name} carries a {len(payload)}-byte payload, expected none")
        if request is Request.GET_FEATURES:
            return encode_u64(self.offered_features)
        if request is Request.SET_FEATURES:
            value = decode_u64_untrusted(payload, name)
            if value & ~self.offered_features:
                raise VhostUserError(
                    f"SET_FEATURES acks {value & ~self.offered_features:#x}, never offered"
                )
            self.features = value
            return None
        if request is Request.GET_PROTOCOL_FEATURES:
            return encode_u64(PROTOCOL_FEATURES)
        if request is Request.SET_PROTOCOL_FEATURES:
            value = decode_u64_untrusted(payload, name)
            if value & ~PROTOCOL_FEATURES:
                raise VhostUserError(
                    f"SET_PROTOCOL_FEATURES acks {value & ~PROTOCOL_FEATURES:#x}, never offered"
                )
            self.protocol_features = value
            return None
        if request is Request.GET_QUEUE_NUM:
            return encode_u64(len(self.vrings))
        if request is Request.SET_OWNER:
            self.owner = True
            return None
        if request is Request.RESET_OWNER:
            self.owner = False
            self.features = 0
            for i, v in enumerate(self.vrings):
                v.close()
                self.vrings[i] = Vring()
            return None
        if request is Request.SET_MEM_TABLE:
            regions = decode_mem_table_untrusted(payload)
            self._mem_table(regions, fds)
            return None
        if request in (Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.SET_VRING_ENABLE,
                       Request.GET_VRING_BASE):
            return self._vring_state(request, decode_vring_state_untrusted(payload, name))
        if request is Request.SET_VRING_ADDR:
            addr = decode_vring_addr_untrusted(payload)
            v = self._vring(addr.index, name)
            desc = self.translate(addr.desc, "descriptor table")
            avail = self.translate(addr.avail, "available ring")
            used = self.translate(addr.used, "used ring")
            if desc % 16 or avail % 2 or used % 4:
                raise VhostUserError(
                    f"vring {addr.index} parts are misaligned: desc {desc:#x} avail {avail:#x}"
                    f" used {used:#x}"
                )
            v.desc, v.avail, v.used = desc, avail, used
            return None
        if request in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
            index, fd = self._take_fd(payload, fds, name)
            v = self.vrings[index]
            if request is Request.SET_VRING_KICK:
                if fd is None:
                    raise VhostUserError(f"SET_VRING_KICK for vring {index} without an fd"
                                         " (polling mode is not supported)")
                v.kick.set_fd(fd)
                v.started = True
                if not self.features >> USER_F_PROTOCOL_FEATURES & 1:
                    v.enabled = True
            elif request is Request.SET_VRING_CALL:
                v.call.set_fd(fd)
                if v.started:
                    # An interrupt raised on the old fd may have been lost: a spurious one on the
                    # new fd is harmless, a lost one could stall the guest.
                    v.call.ring()
            else:
                v.err.set_fd(fd)
            return None
        if request is Request.GET_CONFIG:
            cfg = decode_config_untrusted(payload, name, with_data=False)
            data = self._config_read(cfg.offset, cfg.size)
            return encode_config(ConfigPayload(cfg.offset, cfg.size, cfg.flags, data))
        assert request is Request.SET_CONFIG
        cfg = decode_config_untrusted(payload, name, with_data=True)
        self._config_write(cfg.offset, cfg.data)
        return None

    def _vring_state(self, request: Request, state: VringState) -> bytes | None:
        v = self._vring(state.index, request.name)
        if request is Request.SET_VRING_NUM:
            num = state.num
            if not 1 <= num <= min(MAX_QUEUE_SIZE, self.traits.max_queue_size) or num & (num - 1):
                raise VhostUserError(
                    f"SET_VRING_NUM {num} for vring {state.index} is not a power of two up to"
                    f" {self.traits.max_queue_size}"
                )
            v.num = num
        elif request is Request.SET_VRING_BASE:
            if state.num > 0xFFFF:
                raise VhostUserError(f"SET_VRING_BASE {state.num} does not fit a 16-bit index")
            v.base = state.num
        elif request is Request.SET_VRING_ENABLE:
            if state.num not in (0, 1):
                raise VhostUserError(f"SET_VRING_ENABLE {state.num} is neither 0 nor 1")
            v.enabled = bool(state.num)
        else:  # GET_VRING_BASE: the device was closed; the ring stops.
            v.started = False
            v.enabled = False
            return encode_vring_state(VringState(state.index, v.base))
        return None

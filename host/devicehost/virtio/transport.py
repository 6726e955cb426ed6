"""The virtio transport: serves devices whose ``offer`` returned :class:`DeviceTraits`.

Mapping of the virtio lifecycle onto :class:`devicehost.lifecycle.Device`:

- ``offer`` returns the traits; :meth:`VirtioTransport.add` starts serving them.
- The driver negotiating features and starting every queue (in process: ``VirtioDriver.start``;
  vhost-user: all vrings started and enabled) opens the device with a :class:`QueueResources`
  and starts ``run``.
- Reset / vring stop / VMM disconnect closes the device (queues stopped, runner dropped); the
  next start opens it again.
- :class:`VirtQueue.state` is the queue state (last avail index, used index) that vhost-user's
  GET_VRING_BASE returns; :meth:`VirtioTransport.save` records it for every queue together with
  the device's ``save_open`` value, and :meth:`VirtioTransport.restore` hands ``restore_open``
  queues that resume there (a device that saved None is revoked and offered anew).

A device whose config has a non-empty ``vhost_user_socket`` attribute is served to a VMM over that
Unix socket (:mod:`devicehost.virtio.vhost_user`); every other device waits for the in-process
driver: ``await transport.connect_driver(name)`` returns a started :class:`VirtioDriver`.

Live servicing: a vhost-user device is handed to a new process with its session
(:meth:`VirtioTransport.hands_over`, ``save_for_handoff``, ``restore_handed``,
``start_handed``, driven by :class:`devicehost.host.Host`); a device of the in-process driver
is not (its driver lives in the old process). Both kinds of save carry the chains in flight in
each :class:`QueueState` (:mod:`devicehost.virtio.queue`), replayed once by the restored queues.

Fairness: a guest that keeps its queue full (or kicks without pause) must not starve the other
devices of the event loop. :meth:`VirtQueue.wait_kick` always yields once (the doorbells' waits
do, see :mod:`devicehost.virtio.doorbell`), and :meth:`VirtQueue.pop_wait`, which returns at
once while chains are available, yields after every :data:`POP_BUDGET` chains it returned
without waiting. A device that loops on ``pop``/``pop_many`` alone must call ``wait_kick`` (or
another await) between batches, each batch bounded (e.g. by the queue size).

In-process drivers use guest memory of the transport's own (a 64 MiB memfd at gpa 0 with its own
DMA allocator), so they never collide with the pages the VMBus server and client allocate in
``host.guest_memory``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import anyio
import attrs

from devicehost.errors import (
    ConfigError,
    DeviceError,
    DeviceHostError,
    LifecycleError,
    ends_the_host,
)
from devicehost.excerpt import bounded_message
from devicehost.gate import GuestGate
from devicehost.handoff import HandoffError
from devicehost.memory import DmaAllocator, GuestMemory
from devicehost.virtio.doorbell import Doorbell
from devicehost.virtio.driver import QueueSetup, VirtioDriver
from devicehost.virtio.queue import (
    DescriptorChain,
    QueueError,
    QueueLayout,
    QueueState,
    SplitQueue,
)
from devicehost.virtio.traits import (
    RING_EVENT_IDX,
    RING_INDIRECT_DESC,
    DeviceTraits,
    negotiate,
    offered_features,
)

if TYPE_CHECKING:
    from devicehost.lifecycle import Device

__all__ = [
    "IN_PROCESS_MEMORY",
    "POP_BUDGET",
    "QueueResources",
    "SavedQueue",
    "VirtQueue",
    "VirtioSavedState",
    "VirtioTransport",
    "build_queues",
    "device_config_read",
    "device_config_write",
]

IN_PROCESS_MEMORY: Final = 64 * 1024 * 1024
#: :meth:`VirtQueue.pop_wait` yields to the event loop after this many chains returned in a row
#: without waiting (module docstring: fairness).
POP_BUDGET: Final = 64


class VirtQueue:
    """A started split queue plus its notifications: what a device's runner works with.

    ``pop`` / ``push`` are synchronous; ``wait_kick`` waits until the driver kicked (or buffers
    are already available). A :class:`devicehost.virtio.QueueError` from ``pop`` means the guest
    broke this queue; the device should let ``run`` fail (only this device fails). The ``error``
    doorbell, if any (vhost-user's vring err eventfd), is rung once when that happens.
    """

    def __init__(
        self, index: int, queue: SplitQueue, kick: Doorbell, call: Doorbell,
        error: Doorbell | None = None,
    ) -> None:
        self.index = index
        self.queue = queue
        self.kick = kick
        self.call = call
        self.error = error
        self.interrupts = 0
        self._unyielded = 0  # chains pop_wait returned since it last yielded

    def __repr__(self) -> str:
        return f"<VirtQueue {self.index} size={self.queue.size} {self.queue.state()}>"

    @property
    def size(self) -> int:
        return self.queue.size

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None; QueueError if the guest broke the queue."""
        queue = self.queue
        if queue.broken is None:
            try:
                return queue.pop()
            except QueueError:
                if self.error is not None:
                    self.error.ring()
                raise
        raise queue.broken

    def pop_many(self, limit: int | None = None) -> list[DescriptorChain]:
        """Every available chain (at most ``limit``; see :meth:`SplitQueue.pop_many`). If the
        guest broke the queue during the call, the chains popped before are returned, the
        ``error`` doorbell is rung, and the next call raises; QueueError if none could be."""
        queue = self.queue
        already = queue.broken
        if already is not None:
            raise already
        try:
            chains = queue.pop_many(limit)
        except QueueError:
            if self.error is not None:
                self.error.ring()
            raise
        if queue.broken is not None and self.error is not None:
            self.error.ring()
        return chains

    def push(self, chain: DescriptorChain | int, written: int = 0) -> None:
        """Return a chain (or head index) with ``written`` bytes; interrupts the driver when it
        asked for it."""
        head = chain if isinstance(chain, int) else chain.head
        if self.queue.push(head, written):
            self.interrupts += 1
            self.call.ring()

    def push_deferred(self, chain: DescriptorChain, written: int = 0) -> None:
        """Return a chain without interrupting yet: a batch of these ends with one
        :meth:`signal_used` (one barrier and at most one interrupt for the whole batch)."""
        self.queue.add_used(chain.head, written)

    def signal_used(self) -> None:
        """Interrupt the driver if the chains returned since the last decision need it."""
        if self.queue.needs_interrupt():
            self.interrupts += 1
            self.call.ring()

    def notify(self) -> None:
        """Interrupt the driver unconditionally (e.g. after restoring)."""
        self.interrupts += 1
        self.call.ring()

    async def wait_kick(self) -> None:
        """Wait until new buffers may be available (returns at once if some already are)."""
        if self.queue.enable_notifications():
            await anyio.lowlevel.checkpoint()
            return
        await self.kick.wait()

    async def pop_wait(self) -> DescriptorChain:
        """The next available chain, waiting for kicks as needed (and yielding once every
        :data:`POP_BUDGET` chains that needed no wait)."""
        if self._unyielded >= POP_BUDGET:
            # Before the pop, so that a cancellation here loses no chain.
            self._unyielded = 0
            await anyio.lowlevel.checkpoint()
        while True:
            chain = self.pop()
            if chain is not None:
                self._unyielded += 1
                return chain
            self._unyielded = 0
            await self.wait_kick()

    def state(self) -> QueueState:
        return self.queue.state()


@attrs.frozen
class QueueResources:
    """What a virtio device's ``open`` hook gets: the started queues (in index order), the
    negotiated features and the guest memory the descriptors point into."""

    queues: list[VirtQueue]
    features: int
    memory: GuestMemory


def _device_object(device: Device) -> Any:
    return device.pm.get_plugin(device.name)


def device_config_read(device: Device, traits: DeviceTraits, offset: int, size: int) -> bytes:
    """``size`` bytes of the device's config space at ``offset``: from its
    ``virtio_config_read`` method if it has one, else from ``traits.config``; bytes past the end
    read as zero. Raises ValueError for a negative range or one past 256 bytes."""
    if offset < 0 or size < 0 or offset + size > 256:
        raise ValueError(f"config range {offset}+{size} is outside the 256-byte config space")
    reader = getattr(_device_object(device), "virtio_config_read", None)
    if reader is not None:
        data = bytes(_plugin_call(device, "virtio_config_read", reader, offset, size))
    else:
        data = traits.config[offset : offset + size]
    return data[:size].ljust(size, b"\0")


def device_config_write(device: Device, offset: int, data: bytes) -> None:
    """Forward a config write to the device's ``virtio_config_write`` method; ignored if it has
    none (the config space is read-only)."""
    writer = getattr(_device_object(device), "virtio_config_write", None)
    if writer is not None:
        _plugin_call(device, "virtio_config_write", writer, offset, bytes(data))


def _plugin_call(device: Device, what: str, method: Any, *args: Any) -> Any:
    """Call a device's own method; anything it raises but the host's cancellation (SystemExit
    too) becomes a DeviceError, which the caller contains to this device."""
    try:
        return method(*args)
    except BaseException as exc:
        if ends_the_host(exc):
            raise
        raise DeviceError(f"device {device.name!r} failed in {what}: {exc}") from exc


def build_queues(
    memory: GuestMemory, features: int, setups: Sequence[QueueSetup],
    states: Sequence[QueueState] | None = None,
) -> list[VirtQueue]:
    """Device-side queues for the given layouts (QueueError if the guest's layout is bad)."""
    event_idx = bool(features >> RING_EVENT_IDX & 1)
    indirect = bool(features >> RING_INDIRECT_DESC & 1)
    out = []
    for i, setup in enumerate(setups):
        state = states[i] if states is not None else QueueState()
        split = SplitQueue(memory, setup.layout, event_idx=event_idx, indirect=indirect,
                           state=state)
        out.append(VirtQueue(setup.index, split, setup.kick, setup.call))
    return out


@attrs.frozen
class SavedQueue:
    """One queue of a saved virtio device: where the guest put it and where the device was."""

    layout: QueueLayout
    state: QueueState


@attrs.frozen
class VirtioSavedState:
    """A saved open virtio device: negotiated features, every queue, and whatever the device's
    ``save_open`` hook returned (None: the device does not support save/restore)."""

    features: int
    queues: tuple[SavedQueue, ...]
    device_state: Any = None


class _InProcessLink:
    """The device side of an in-process driver (implements ``driver.DeviceLink``)."""

    def __init__(self, device: Device, traits: DeviceTraits, memory: GuestMemory,
                 gate: GuestGate | None = None) -> None:
        self.device = device
        self.traits = traits
        self.memory = memory
        #: The host's guest gate: the driver's start and reset wait there while the host is saved.
        self.gate = gate if gate is not None else GuestGate()
        self.resources: QueueResources | None = None
        self.setups: tuple[QueueSetup, ...] = ()
        from devicehost.virtio.remote import runs_in_worker

        #: A device in a worker needs kicks and calls it can be handed (the driver reads this).
        self.eventfd_doorbells = runs_in_worker(device)

    @property
    def offered_features(self) -> int:
        return offered_features(self.traits)

    @property
    def queue_count(self) -> int:
        return self.traits.queue_count

    @property
    def max_queue_size(self) -> int:
        return self.traits.max_queue_size

    def read_config(self, offset: int, size: int) -> bytes:
        return device_config_read(self.device, self.traits, offset, size)

    def write_config(self, offset: int, data: bytes) -> None:
        device_config_write(self.device, offset, data)

    async def start(self, features: int, queues: Sequence[QueueSetup]) -> None:
        negotiate(self.offered_features, features)
        if len(queues) != self.traits.queue_count:
            raise ValueError(f"the device has {self.traits.queue_count} queues, not {len(queues)}")
        resources = QueueResources(build_queues(self.memory, features, queues), features,
                                   self.memory)
        async with self.gate.passage(f"driver start of device {self.device.name!r}"):
            await self.device.open(resources)
        self.resources = resources
        self.setups = tuple(queues)

    async def reset(self) -> None:
        self.resources = None
        async with self.gate.passage(f"driver reset of device {self.device.name!r}"):
            await self.device.close()

    async def save(self) -> VirtioSavedState:
        if self.resources is None:
            raise LifecycleError(f"device {self.device.name!r} is not open; nothing to save")
        await self.device.stop()
        device_state = await self.device.save()
        queues = tuple(SavedQueue(q.queue.layout, q.state()) for q in self.resources.queues)
        return VirtioSavedState(self.resources.features, queues, device_state)

    async def restore(self, saved: VirtioSavedState) -> None:
        if len(saved.queues) != len(self.setups):
            raise LifecycleError("the saved state has another number of queues")
        await self.device.close()
        self.resources = None
        if saved.device_state is None:
            # The device cannot restore: it is revoked and offered anew (the driver must reset).
            await self.device.revoke()
            await self.device.offer()
            return
        setups = [
            QueueSetup(s.index, q.layout, s.kick, s.call)
            for s, q in zip(self.setups, saved.queues, strict=True)
        ]
        resources = QueueResources(
            build_queues(self.memory, saved.features, setups, [q.state for q in saved.queues]),
            saved.features, self.memory,
        )
        await self.device.restore(saved.device_state, resources)
        self.resources = resources
        await self.device.start()
        for q in resources.queues:
            q.notify()  # buffers may have completed before the save: let the driver look


@attrs.define
class _Served:
    device: Device
    traits: DeviceTraits
    scope: anyio.CancelScope | None = None
    backend: Any = None  # the VhostUserBackend serving the device, if any
    link: _InProcessLink | None = None


class VirtioTransport:
    """Serves virtio devices in process or over vhost-user (see the module docstring)."""

    def __init__(self, host: Any) -> None:
        self.host = host
        self._served: dict[str, _Served] = {}
        self._memory: GuestMemory | None = None
        self._allocator: DmaAllocator | None = None

    @property
    def memory(self) -> GuestMemory:
        """The guest memory of in-process drivers (created on first use)."""
        if self._memory is None:
            self._memory = GuestMemory.memfd(IN_PROCESS_MEMORY)
            self._allocator = DmaAllocator(self._memory)
        return self._memory

    @property
    def allocator(self) -> DmaAllocator:
        self.memory  # noqa: B018 - creates the allocator with the memory
        assert self._allocator is not None
        return self._allocator

    async def add(self, device: Device, offer: Any) -> None:
        if not isinstance(offer, DeviceTraits):
            raise ConfigError(f"device {device.name!r}: the virtio transport needs DeviceTraits")
        if device.name in self._served:
            raise LifecycleError(f"device {device.name!r} is already served over virtio")
        served = _Served(device, offer)
        socket_path = getattr(device.ctx.config, "vhost_user_socket", "") or ""
        if socket_path:
            from devicehost.virtio.vhost_user import VhostUserBackend

            served.backend = VhostUserBackend(device, offer, str(socket_path))
            if not device.ctx.fds.carries_fds:
                served.scope = await self.host.task_group.start(served.backend.serve)
            # else: taken over: the listener comes from the handoff (restore_handed), and
            # nothing is served before the commit (start_handed).
        self._served[device.name] = served

    # -- live handover (devicehost.virtio.vhost_handover) -----------------------------------------

    def hands_over(self, device: Device) -> bool:
        """True if ``device`` can be handed to a new process live: it is served over
        vhost-user. (A device of the in-process driver cannot: its driver lives in this
        process.)"""
        served = self._served.get(device.name)
        return served is not None and served.backend is not None

    async def save_for_handoff(self, device: Device) -> Any:
        """The device's vhost-user session and state for a handoff (its descriptors put in its
        ``ctx.fds``); None if the device saves nothing."""
        backend = self._served[device.name].backend
        return await backend.save_for_handoff()

    async def restore_handed(self, device: Device, state: Any) -> None:
        """Rebuild a handed-over session and restore the device on it (nothing runs yet);
        :class:`HandoffError` naming the device if it cannot be."""
        from devicehost.virtio.vhost_handover import (
            VhostUserHandover,
            decode_device_state_untrusted,
        )

        served = self._served.get(device.name)
        name = f"device {device.name!r} (plugin {device.ctx.plugin!r})"
        if served is None or served.backend is None:
            raise HandoffError(f"{name} is not served over vhost-user here, but was handed over")
        if not isinstance(state, VhostUserHandover):
            raise HandoffError(f"{name}: the handed-over state is a {type(state).__name__}, not"
                               " a vhost-user session")
        try:
            device_state = decode_device_state_untrusted(state, device.name, device.ctx.plugin)
            await served.backend.restore_handover(state, device_state)
        except (DeviceHostError, ValueError, OSError) as exc:
            raise HandoffError(f"{name} failed to restore: {bounded_message(str(exc))}"
                               ) from exc

    async def start_handed(self, device: Device) -> None:
        """After the commit: run the restored device and resume its connection."""
        served = self._served[device.name]
        await served.backend.start_adopted()
        served.scope = await self.host.task_group.start(served.backend.serve)

    async def remove(self, device: Device) -> None:
        served = self._served.pop(device.name, None)
        if served is not None and served.scope is not None:
            served.scope.cancel()
        await device.revoke()

    async def aclose(self) -> None:
        for served in list(self._served.values()):
            await self.remove(served.device)
        if self._memory is not None:
            self._memory.close()
            self._memory = None
            self._allocator = None

    def describe(self, device_name: str) -> dict[str, Any]:
        """A JSON-able view of how ``device_name`` is served: mode, features, queue positions,
        and for vhost-user the socket, connection count and protocol errors."""
        served = self._served.get(device_name)
        if served is None:
            raise LifecycleError(f"no virtio device {device_name!r} is served")
        tree: dict[str, Any] = {
            "device_id": served.traits.device_id,
            "offered_features": offered_features(served.traits),
        }
        resources: QueueResources | None = None
        if served.backend is not None:
            backend = served.backend
            tree.update(mode="vhost-user", socket=backend.path,
                        connections=backend.connections, errors=list(backend.errors))
            resources = backend.resources
        else:
            tree["mode"] = "in-process"
            resources = served.link.resources if served.link is not None else None
        if resources is not None:
            tree["features"] = resources.features
            tree["queues"] = [
                {"index": q.index, "size": q.size, "last_avail_idx": q.state().last_avail_idx,
                 "used_idx": q.state().used_idx, "interrupts": q.interrupts,
                 "broken": None if q.queue.broken is None else str(q.queue.broken)}
                for q in resources.queues
            ]
        return tree

    def vhost_user_backend(self, device_name: str) -> Any:
        """The :class:`devicehost.virtio.vhost_user.VhostUserBackend` serving ``device_name``."""
        served = self._served.get(device_name)
        if served is None or served.backend is None:
            raise LifecycleError(f"device {device_name!r} is not served over vhost-user")
        return served.backend

    def _link(self, device_name: str) -> _InProcessLink:
        served = self._served.get(device_name)
        if served is None or served.link is None:
            raise LifecycleError(f"device {device_name!r} has no in-process driver")
        return served.link

    async def save(self, device_name: str) -> VirtioSavedState:
        """Stop the in-process device and save it: queue positions plus its ``save_open``."""
        return await self._link(device_name).save()

    async def restore(self, device_name: str, saved: VirtioSavedState) -> None:
        """Rebuild the device from ``saved`` over the same driver rings (``restore_open``), and
        run it; a device that saved nothing is revoked and offered anew instead."""
        await self._link(device_name).restore(saved)

    async def connect_driver(
        self, device_name: str, queue_size: int = 256, *, features: int | None = None
    ) -> VirtioDriver:
        """A started in-process driver for ``device_name`` (the device is open and running).

        ``features`` defaults to everything offered. ``await driver.reset()`` closes the device.
        """
        served = self._served.get(device_name)
        if served is None:
            raise LifecycleError(f"no virtio device {device_name!r} is served in process")
        if served.scope is not None:
            raise LifecycleError(f"device {device_name!r} is served over vhost-user")
        link = _InProcessLink(served.device, served.traits, self.memory,
                              getattr(self.host, "gate", None))
        driver = VirtioDriver(link, self.memory, self.allocator)
        await driver.start(queue_size=queue_size, features=features)
        served.link = link
        return driver

"""The VMBus transport: serves devices whose ``offer`` hook returns :class:`OfferParams`.

One :class:`VmbusTransport` per host owns the host's single :class:`VmbusServer` over
``host.guest_memory`` and maps each channel's events to the device's lifecycle
(:class:`devicehost.lifecycle.Device`), as upstream's SimpleDeviceWrapper does (facts §5.3):

==========================  ================================================================
channel event               device
==========================  ================================================================
guest opens                 ``await device.open(OpenResources(channel, memory, request))``
                            (which starts ``run``); a failing ``open`` fails the guest's open
                            with status 0x8000FFFF
guest closes                ``await device.close()`` (stop ``run``, ``close`` hook, drop runner)
guest retargets interrupt   nothing to do in process: signalling is part of the channel
host removes the device     revoke the offer (subchannels first), then ``device.revoke()``
host saved (quiesced)       the guest's open, close and modify wait at the host's
                            :class:`~devicehost.gate.GuestGate` until the host resumes; if
                            it closes instead they fail (open: status 0x8000FFFF)
save                        stop, ``device.save()`` (None = not supported), start again
restore                     ``device.restore(state, resources)``, or revoke and offer anew
==========================  ================================================================

Save/restore: :meth:`VmbusTransport.save` returns the server's state and each device's saved
state. A host restoring calls :meth:`VmbusTransport.restore` on its fresh transport *before*
adding the devices again; each :meth:`add` then restores its device: the channel keeps its id,
its GPADLs and (if the device saved a state) its open ring, and the device's runner is rebuilt by
``restore_open`` and started. A device that was open but saved nothing is revoked and offered
anew (its guest sees a rescind and a new offer). In a live handover (:attr:`strict_restore`,
:mod:`devicehost.vmbus.handover`) nothing is offered anew: a device that cannot continue its
channel fails, and restored devices are started only after the old process committed.
"""

from __future__ import annotations

import logging
import os
import typing
from typing import TYPE_CHECKING, Any

import attrs

from devicehost.errors import ConfigError, LifecycleError
from devicehost.gate import GuestGate
from devicehost.memory import DmaAllocator
from devicehost.vmbus.client import VmbusClient
from devicehost.vmbus.protocol import (
    STATUS_SUCCESS,
    ModifyRequest,
    OfferParams,
    OpenResources,
)
from devicehost.vmbus.server import ChannelHandle, ServerSavedState, VmbusServer

if TYPE_CHECKING:
    from devicehost.lifecycle import Device
    from devicehost.vmbus.remote import SignalBridge
    from devicehost.vmbus.socketserver import VmbusSocketServer

__all__ = ["VmbusSavedState", "VmbusTransport"]

log = logging.getLogger("devicehost.vmbus.transport")


@attrs.frozen
class VmbusSavedState:
    """What :meth:`VmbusTransport.save` returns: the server's state and, per device name, the
    state its ``save_open`` returned (None: closed, or save not supported)."""

    server: ServerSavedState
    devices: dict[str, Any] = attrs.field(factory=dict)


class _ChannelDevice:
    """The server's view of one served device (a :class:`devicehost.vmbus.server.ChannelDevice`).

    The server calls it for the guest's requests, so each call passes the host's guest gate:
    while the host is saved, the guest's request waits there instead of running the device.
    """

    def __init__(self, device: Device, params: OfferParams, gate: GuestGate,
                 transport: VmbusTransport | None = None) -> None:
        self.device = device
        self.params = params
        self.gate = gate
        self.transport = transport
        #: Set when the device's worker died for good: the channel is revoked without calling
        #: the device, which stays FAILED with its cause.
        self.failed = False

    async def open(self, resources: OpenResources) -> None:
        async with self.gate.passage(f"open of device {self.device.name!r}"):
            if self.transport is not None:
                resources = self.transport.for_device(self.device, resources)
            await self.device.open(resources, subchannel_index=self.params.subchannel_index)

    async def close(self) -> None:
        if self.failed:
            return  # the worker is gone: its runner is closed when the device is removed
        async with self.gate.passage(f"close of device {self.device.name!r}"):
            await self.device.close()

    async def modify(self, request: ModifyRequest) -> int:
        async with self.gate.passage(f"modify of device {self.device.name!r}"):
            log.debug("device %r: interrupt retargeted to VP %d", self.device.name,
                      request.target_vp)
            return STATUS_SUCCESS


class _HostSideServer:
    """The server as a client inside the host sees it (the intercept relay, a VMBus client
    device of this host): its requests are the host's own, so they pass the guest gate. A relay
    stopped by :meth:`devicehost.host.Host.save` closes the channels it opened; held at the gate
    of the host saving it, that close would never end."""

    def __init__(self, server: VmbusServer, gate: GuestGate) -> None:
        self._server = server
        self._gate = gate

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)

    async def request(self, channel_id: int, request: Any) -> Any:
        with self._gate.bypass():
            return await self._server.request(channel_id, request)


class VmbusTransport:
    """Serves VMBus devices on the host's in-process VMBus server."""

    def __init__(self, host: Any) -> None:
        self.host = host
        self.server = VmbusServer(host.guest_memory)
        self._allocator: DmaAllocator | None = None
        self._handles: dict[str, ChannelHandle] = {}
        self._devices: dict[str, Device] = {}
        self._clients: list[VmbusClient] = []
        self._restoring: dict[str, Any] = {}
        #: Per device in a worker, the signal bridge of its in-process guest's channel.
        self._bridges: dict[str, SignalBridge] = {}
        #: The host's guest gate (a host built without one, as some tests do, gets its own).
        self.gate: GuestGate = getattr(host, "gate", None) or GuestGate()
        #: The VMBus socket serving this server to a guest in another process (if configured).
        self.socket: VmbusSocketServer | None = None
        #: A live handover (devicehost.vmbus.handover): a device that cannot continue its
        #: channel fails its add (nothing is offered anew) and restored devices are not started
        #: but collected in :attr:`held`, started after the old process committed.
        self.strict_restore = False
        self.held: list[Device] = []

    @property
    def allocator(self) -> DmaAllocator:
        """The one DMA allocator over the guest memory, shared by every client of this host."""
        if self._allocator is None:
            self._allocator = DmaAllocator(self.server.memory)
        return self._allocator

    def client(self) -> VmbusClient:
        """A guest-side client of this host's server (closed with the transport)."""
        client = VmbusClient(self.server, self.allocator)
        self._clients.append(client)
        return client

    def host_client(self, *, see_hidden: bool = False) -> VmbusClient:
        """A client for a device of this host that is itself a VMBus client (the intercept
        relay). Unlike a guest's, its requests are never held at the guest gate. Its owner closes
        it."""
        server = typing.cast(VmbusServer, _HostSideServer(self.server, self.gate))
        return VmbusClient(server, self.allocator, see_hidden=see_hidden)

    def handle_of(self, device: Device) -> ChannelHandle:
        """The server handle of a served device (KeyError if it is not served here)."""
        return self._handles[device.name]

    # -- the Transport protocol ---------------------------------------------------------------

    async def add(self, device: Device, offer: Any) -> None:
        """Offer ``device`` on the server (restoring it if a restore is pending for it)."""
        if not isinstance(offer, OfferParams):
            raise ConfigError(f"device {device.name!r}: the VMBus transport needs OfferParams, "
                              f"not {type(offer).__name__}")
        if device.name in self._handles:
            raise ConfigError(f"device {device.name!r} is already offered on VMBus")
        handle = self.server.add_child(offer, _ChannelDevice(device, offer, self.gate, self))
        self._handles[device.name] = handle
        self._devices[device.name] = device
        if device.name in self._restoring:
            await self._restore_device(device, handle, self._restoring.pop(device.name))

    async def remove(self, device: Device) -> None:
        """Revoke the device's offer (closing it if open), then mark the device revoked."""
        handle = self._handles.pop(device.name, None)
        self._devices.pop(device.name, None)
        with self.gate.bypass():  # the host's own close of the channel never waits at the gate
            if handle is not None:
                await handle.revoke()
            await device.revoke()
        bridge = self._bridges.pop(device.name, None)
        if bridge is not None:
            bridge.close()

    def isolated(self, device: Device) -> bool:
        """Whether ``device`` runs in a worker process (``docs/workers.md``)."""
        workers = getattr(self.host, "workers", None)
        return workers is not None and device.name in workers.proxies

    def for_device(self, device: Device, resources: OpenResources) -> OpenResources:
        """``resources`` as ``device`` gets them. Inline: unchanged. In a worker, a channel of
        the in-process guest signals through eventfds joined to its in-process signal by a
        bridge task that ends with the channel, or when the device gets another channel (a VMBus
        socket guest's channel signals through eventfds already: unchanged). See
        :mod:`devicehost.vmbus.remote`."""
        from devicehost.vmbus.channel import EventfdSignal
        from devicehost.vmbus.remote import bridge_signal

        if not self.isolated(device) or isinstance(resources.channel.signal, EventfdSignal):
            return resources
        resources, bridge = bridge_signal(resources)
        previous = self._bridges.pop(device.name, None)
        if previous is not None:
            previous.close()
        self._bridges[device.name] = bridge
        self.host.task_group.start_soon(bridge.run)
        return resources

    async def reoffer(self, name: str) -> None:
        """Revoke device ``name``'s offer (closing its channel and dropping its GPADLs) and offer
        it anew under a new channel id: its guest sees a rescind and a new offer. What a device
        in a worker gets after its worker was restarted; a failure is logged, never raised."""
        device = self._devices.get(name)
        if device is None:
            return
        try:
            await self.remove(device)
            offer = await device.offer()
            await self.add(device, offer)
        except Exception as exc:
            log.error("device %r could not be offered again after its worker restarted: %s",
                      name, exc)
            return
        log.info("device %r: offered again (channel %d) after its worker restarted", name,
                 self._handles[name].channel_id)

    async def revoke_failed(self, name: str, cause: str) -> None:
        """Revoke the offer of device ``name``, whose worker died for good while its channel was
        open: the channel closes and its GPADLs are dropped, the guest sees a rescind; the
        device stays FAILED (with ``cause``) and is not offered again."""
        handle = self._handles.pop(name, None)
        if handle is None:
            return
        channel_device = handle.device
        if isinstance(channel_device, _ChannelDevice):
            channel_device.failed = True
        with self.gate.bypass():
            await handle.revoke()
        bridge = self._bridges.pop(name, None)
        if bridge is not None:
            bridge.close()
        log.warning("device %r: its worker failed for good (%s); its VMBus offer is revoked",
                    name, cause)

    async def serve_socket(self, path: str | os.PathLike[str], *,
                           allow_unsealed_memory: bool = False) -> VmbusSocketServer:
        """Serve this transport's server on the VMBus socket ``path`` (``docs/vmbus-socket.md``)
        until the transport closes. ConfigError if the path cannot be listened on."""
        from devicehost.vmbus.socketserver import VmbusSocketServer

        if self.socket is not None:
            raise ConfigError(f"the VMBus socket is served already at {self.socket.path!r}")
        socket_server = VmbusSocketServer(self.server, path,
                                          allow_unsealed_memory=allow_unsealed_memory)
        await self.host.task_group.start(socket_server.serve)
        self.socket = socket_server
        return socket_server

    def abandon(self) -> None:
        """Everything this transport serves belongs to another process now (a committed
        handover): whatever still runs here on the way out closes no channel and unlinks
        nothing."""
        if self.socket is not None:
            self.socket.abandon()

    async def aclose(self) -> None:
        if self.socket is not None:
            await self.socket.aclose()
            self.socket = None
        with self.gate.bypass():
            for client in self._clients:
                await client.aclose()
            self._clients.clear()
            await self.server.aclose()
        self._handles.clear()
        self._devices.clear()
        for bridge in self._bridges.values():
            bridge.close()
        self._bridges.clear()

    # -- save / restore -----------------------------------------------------------------------

    async def save(self) -> VmbusSavedState:
        """Save the server and every served device; running devices are stopped to save and
        started again afterwards."""
        states: dict[str, Any] = {}
        for name, handle in self._handles.items():
            device = self._devices[name]
            was_running = await device.stop()
            try:
                states[name] = await device.save() if handle.is_open else None
            finally:
                if was_running:
                    await device.start()
        return VmbusSavedState(self.server.save(), states)

    def restore(self, saved: VmbusSavedState) -> None:
        """Take a saved state; call it before the devices are added again."""
        if self._handles:
            raise LifecycleError("restore the VMBus transport before adding devices")
        self.server.restore(saved.server)
        self._restoring = dict(saved.devices)

    async def _restore_device(self, device: Device, handle: ChannelHandle, state: Any) -> None:
        result = await handle.restore(was_open=state is not None)
        resources = handle.open_resources
        if result.open_request is None or resources is None:
            if state is not None and self.strict_restore:
                raise LifecycleError(f"device {device.name!r} saved an open channel that was"
                                     " not handed over open")
            if state is not None:
                log.warning("device %r saved an open channel the server did not restore",
                            device.name)
            return
        try:
            await device.restore(state, self.for_device(device, resources),
                                 subchannel_index=handle.params.subchannel_index)
        except Exception as exc:
            if self.strict_restore:
                raise
            # The device cannot continue its channel: offer it anew, as if it saved nothing.
            log.warning("device %r failed to restore (%s); offering it anew", device.name, exc)
            await handle.revoke()
            del self._handles[device.name]
            del self._devices[device.name]
            await device.offer()
            await self.add(device, handle.params)
            return
        if self.strict_restore:
            self.held.append(device)
        else:
            await device.start()

    def resources_for_restore(self, device: Device) -> OpenResources:
        """Fresh resources over the device's open channel (same ring pages and guest signal),
        for rebuilding its runner with ``restore_open`` in the same process."""
        return self.for_device(device, self.handle_of(device).rebuild_channel())

    def inspect(self) -> dict[str, Any]:
        tree = self.server.inspect()
        if self.socket is not None:
            tree["socket"] = self.socket.inspect()
        return tree

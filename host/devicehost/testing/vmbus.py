"""Test-kit helpers for VMBus devices: open a device's channel the way a guest would.

Two entry points:

- :func:`vmbus_guest` needs no host and no installation: it builds the device from its class and
  config with :mod:`devicehost.lifecycle`, serves it on a fresh in-process VMBus server over a
  fresh memfd-backed guest memory, and opens its channel from a :class:`VmbusClient`::

      async with vmbus_guest(MyDevice, MyConfig()) as guest:
          await guest.pipe.send(b"request")
          assert await guest.pipe.recv() == b"response"

- :func:`guest_open_channel` opens a device served by a running :class:`devicehost.host.Host`
  (what :func:`devicehost.testing.guest.guest_session` uses for VMBus devices).
- :func:`socket_guest_session` runs a host with chosen device classes whose VMBus server is
  served on a VMBus socket (``docs/vmbus-socket.md``) and connects a
  :class:`~devicehost.vmbus.socketclient.SocketVmbusClient` to it over the real socket (the
  ``devicehost_vmbus_socket_guest`` fixture returns it)::

      async with socket_guest_session({"vmbfs": VmbfsDevice}) as session:
          offer = await session.client.wait_offer(lambda o: True)
          async with session.client.opened(offer) as channel:
              ...
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from devicehost.config import HostSettings
from devicehost.context import DeviceContext
from devicehost.lifecycle import Device, DeviceState, new_device_manager
from devicehost.memory import GuestMemory
from devicehost.vmbus.client import DEFAULT_RING_PAGES, ClientChannel, VmbusClient
from devicehost.vmbus.pipe import MessagePipe
from devicehost.vmbus.protocol import IncomingOffer, OfferParams
from devicehost.vmbus.server import VmbusServer
from devicehost.vmbus.socketclient import SocketVmbusClient
from devicehost.vmbus.transport import VmbusTransport

__all__ = [
    "DEFAULT_GUEST_MEMORY",
    "STEP_TIMEOUT",
    "SocketGuestSession",
    "VmbusGuest",
    "check_vmbus_device",
    "guest_open_channel",
    "socket_guest_session",
    "vmbus_guest",
]

#: Seconds one step of :func:`check_vmbus_device` may take before it is called a hang.
STEP_TIMEOUT = 10.0

#: Guest memory of :func:`vmbus_guest` (plenty for a few channels' rings).
DEFAULT_GUEST_MEMORY = 4 * 1024 * 1024


class _BareHost:
    """What :class:`VmbusTransport` needs of a host, without a host."""

    def __init__(self, memory: GuestMemory, task_group: anyio.abc.TaskGroup) -> None:
        self.guest_memory = memory
        self.task_group = task_group
        self.logger = logging.getLogger("devicehost.testing.vmbus")
        self.devices: dict[str, Device] = {}


class VmbusGuest:
    """A device served on its own VMBus server, and the guest that opened it.

    ``channel`` is the guest's open channel (None after :meth:`close`), ``pipe`` a message pipe
    over its guest end. :meth:`close` and :meth:`open` close and reopen the channel as a guest
    would (new ring memory each time).
    """

    def __init__(self, device: Device, transport: VmbusTransport, client: VmbusClient,
                 offer: IncomingOffer, ring_pages: int) -> None:
        self.device = device
        self.transport = transport
        self.server: VmbusServer = transport.server
        self.client = client
        self.offer = offer
        self.ring_pages = ring_pages
        self.channel: ClientChannel | None = None
        self._pipe: MessagePipe | None = None

    @property
    def memory(self) -> GuestMemory:
        return self.server.memory

    @property
    def pipe(self) -> MessagePipe:
        """A message pipe over the open channel's guest end."""
        if self.channel is None or self._pipe is None:
            raise RuntimeError("the guest's channel is not open")
        return self._pipe

    async def open(self) -> ClientChannel:
        """Open the channel (GPADL + open); the device's ``open`` hook runs before this returns."""
        if self.channel is not None:
            raise RuntimeError("the guest's channel is already open")
        self.offer = await self.client.wait_offer(lambda o: o.offer.key == self.offer.offer.key)
        self.channel = await self.client.open(self.offer, ring_pages=self.ring_pages)
        self._pipe = self.channel.message_pipe()
        return self.channel

    async def close(self) -> None:
        """Close the channel, tear its GPADL down and free its memory."""
        channel, self.channel, self._pipe = self.channel, None, None
        if channel is not None:
            await channel.close()


@asynccontextmanager
async def vmbus_guest(
    device_class: type[Any],
    config: Any = None,
    *,
    name: str = "dut",
    ring_pages: int = DEFAULT_RING_PAGES,
    memory_size: int = DEFAULT_GUEST_MEMORY,
    open_channel: bool = True,
) -> AsyncIterator[VmbusGuest]:
    """Serve one ``device_class(config)`` on a fresh VMBus server and open it as a guest.

    ``config`` defaults to ``device_class.config_class()``. The device's ``offer`` hook must
    return :class:`OfferParams`. With ``open_channel=False`` the channel is left for the test to
    open (:meth:`VmbusGuest.open`). Everything is closed when the block exits.
    """
    if config is None and hasattr(device_class, "config_class"):
        config = device_class.config_class()
    memory = GuestMemory.memfd(memory_size)
    try:
        async with anyio.create_task_group() as tg:
            instance = device_class(config)
            ctx = DeviceContext(name=name, plugin=name, config=config,
                                logger=logging.getLogger(f"devicehost.device.{name}"))
            device = Device(ctx, new_device_manager(instance, name), tg)
            offer = await device.offer()
            if not isinstance(offer, OfferParams):
                raise TypeError(f"{device_class.__qualname__} offers {type(offer).__name__}, "
                                "not devicehost.vmbus.OfferParams")
            transport = VmbusTransport(_BareHost(memory, tg))
            await transport.add(device, offer)
            client = transport.client()
            incoming = await client.wait_offer(lambda o: o.offer.key == offer.key)
            guest = VmbusGuest(device, transport, client, incoming, ring_pages)
            try:
                if open_channel:
                    await guest.open()
                yield guest
            finally:
                with anyio.CancelScope(shield=True):
                    await guest.close()
                    await transport.remove(device)
                    await transport.aclose()
                tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The block's own exception, not a group of one: tests match on what they raised.
        raise _single(group) from None
    finally:
        memory.close()


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


@asynccontextmanager
async def guest_open_channel(
    host: Any, device: Device, *, ring_pages: int = DEFAULT_RING_PAGES
) -> AsyncIterator[ClientChannel]:
    """Open ``device`` (served by ``host``'s VMBus transport) from a guest-side client; yields
    the guest's :class:`ClientChannel` and closes it afterwards."""
    transport = host.transport(VmbusTransport)
    key = transport.handle_of(device).key
    client = transport.client()
    try:
        offer = await client.wait_offer(lambda o: o.offer.key == key)
        async with client.opened(offer, ring_pages=ring_pages) as channel:
            yield channel
    finally:
        with anyio.CancelScope(shield=True):
            await client.aclose()


def _state(device: Device) -> DeviceState:
    # Read afresh: the state changes across awaits, which type narrowing does not know.
    return device.state


async def check_vmbus_device(device_class: type[Any], config: Any = None) -> None:
    """The VMBus part of the device contract, driven from the guest side.

    Checks that the offer is stable and valid VMBus :class:`OfferParams`; that the guest's open
    runs the device (``open`` then ``run``); that the guest's close closes it (runner dropped);
    that a second open works with fresh ring memory; and that removing the device revokes the
    guest's offer and leaves no GPADL behind. Raises AssertionError (or TimeoutError for a hang).
    """
    with anyio.fail_after(STEP_TIMEOUT):
        async with vmbus_guest(device_class, config) as guest:
            device = guest.device
            assert isinstance(device.offer_value, OfferParams)
            again = device.pm.hook.offer(ctx=device.ctx, incoming=None)
            assert again == device.offer_value, "offer must describe the same channel every time"
            assert guest.offer.offer.key == device.offer_value.key
            await anyio.wait_all_tasks_blocked()  # let run reach its first wait (or return)
            assert _state(device) is DeviceState.RUNNING, (
                f"the guest's open must run the device; it is {_state(device).value}"
                f" ({device.failure})"
            )
            await guest.close()
            assert _state(device) is DeviceState.CLOSED and device.runner is None, (
                f"the guest's close must close the device; it is {_state(device).value}"
            )
            await guest.open()
            await anyio.wait_all_tasks_blocked()
            assert _state(device) is DeviceState.RUNNING, "a reopened device must run again"
            offer = guest.offer
            await guest.transport.remove(device)
            assert offer.revoked is not None and offer.revoked.is_set(), "removal must revoke"
            assert _state(device) is DeviceState.REVOKED
            assert guest.server.inspect()["gpadls"] == {}, "a revoke must drop every GPADL"


class SocketGuestSession:
    """A host serving its VMBus on a socket, and a socket guest connected to it."""

    def __init__(self, host: Any, client: SocketVmbusClient, path: Path) -> None:
        self.host = host
        self.client = client
        self.path = path

    @property
    def transport(self) -> VmbusTransport:
        transport: VmbusTransport = self.host.transport(VmbusTransport)
        return transport


@asynccontextmanager
async def socket_guest_session(
    device_classes: Mapping[str, type[Any]],
    devices: Sequence[Any] | None = None,
    *,
    socket_path: str | Path | None = None,
    memory_size: int = DEFAULT_GUEST_MEMORY,
    allow_unsealed_memory: bool = False,
) -> AsyncIterator[SocketGuestSession]:
    """Serve ``devices`` (as :func:`devicehost.testing.host_with`) with ``[host] vmbus_socket``
    at ``socket_path`` (default: in a fresh temporary directory) and connect a socket guest
    with ``memory_size`` bytes of sealed memory. Everything is closed when the block exits."""
    from devicehost.testing.registry import host_with

    with tempfile.TemporaryDirectory(prefix="devicehost-vmbus-") as tmp:
        path = Path(socket_path) if socket_path is not None else Path(tmp) / "vmbus.sock"
        settings = HostSettings(vmbus_socket=path, allow_unsealed_memory=allow_unsealed_memory)
        async with (
            host_with(device_classes, devices, settings=settings) as host,
            SocketVmbusClient.connect(path, memory_size=memory_size) as client,
        ):
            yield SocketGuestSession(host, client, path)

"""The intercept transport: serves devices whose ``offer`` hook returns an InterceptClaim.

The host maps an :class:`devicehost.vmbus.InterceptClaim` offer to :class:`InterceptTransport`
(one per host). :meth:`InterceptTransport.add` builds an :class:`InterceptWrapper` for the
client device, registers it with the host's :class:`ChannelRelay` (made on first use over a
VMBus client of the host's VMBus server that sees hidden offers and shares the host's DMA
allocator, so ring pages never collide with other clients') and starts it unless the relay is
stopped. :meth:`InterceptTransport.remove` is the device's revoke: the wrapper closes its channel
without saving, forgets the offer, and the device is revoked.

The transport offers no ``resources_for_restore``: an intercepted channel is never restored in
place. Its device's saved state is stashed on stop and used by ``restore_open`` over the next,
freshly opened channel (so the test kit's save/restore check stops at the encoding round trip).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from devicehost.errors import ConfigError
from devicehost.vmbus.protocol import InterceptClaim
from devicehost.vmbus.transport import VmbusTransport
from devicehost_intercept.relay import ChannelRelay
from devicehost_intercept.wrapper import InterceptWrapper

if TYPE_CHECKING:
    from devicehost.lifecycle import Device

__all__ = ["InterceptTransport"]


class InterceptTransport:
    """Serves VMBus client devices through the host's intercept relay."""

    def __init__(self, host: Any) -> None:
        self.host = host
        self._relay: ChannelRelay | None = None
        self._wrappers: dict[str, InterceptWrapper] = {}

    async def relay(self) -> ChannelRelay:
        """The host's relay, made and started on first use."""
        if self._relay is None:
            vmbus = self.host.transport(VmbusTransport)
            client = vmbus.host_client(see_hidden=True)  # the host's own: not held at the gate
            relay = ChannelRelay(client)
            await self.host.task_group.start(relay.serve)
            self._relay = relay
        return self._relay

    def wrapper_of(self, device: Device) -> InterceptWrapper:
        """The wrapper driving ``device`` (KeyError if it is not served here)."""
        return self._wrappers[device.name]

    async def add(self, device: Device, offer: Any) -> None:
        """Intercept the instance id ``offer`` claims for ``device``."""
        if not isinstance(offer, InterceptClaim):
            raise ConfigError(f"device {device.name!r}: the intercept transport needs an "
                              f"InterceptClaim, not {type(offer).__name__}")
        if device.name in self._wrappers:
            raise ConfigError(f"device {device.name!r} already intercepts a channel")
        relay = await self.relay()
        try:
            wrapper = InterceptWrapper(device, offer, relay.client)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        relay.register(wrapper)
        self._wrappers[device.name] = wrapper
        if relay.running:
            await wrapper.start()

    async def remove(self, device: Device) -> None:
        """Revoke ``device``: close its channel (nothing saved) and forget its claim."""
        wrapper = self._wrappers.pop(device.name, None)
        if wrapper is not None:
            if self._relay is not None:
                self._relay.unregister(wrapper)
            await wrapper.forget()
        await device.revoke()

    async def aclose(self) -> None:
        for device_name in list(self._wrappers):
            wrapper = self._wrappers.pop(device_name)
            await wrapper.forget()
        if self._relay is not None:
            await self._relay.aclose()
            self._relay = None

    def inspect(self) -> dict[str, Any]:
        return {} if self._relay is None else self._relay.inspect()

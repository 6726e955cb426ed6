"""The ``intercept`` device: the host's intercept relay, as operators see and control it.

Configured like any device (plugin ``intercept``, no keys required), it is a local device whose
runner is the host's :class:`ChannelRelay`:

- ``run`` keeps every wrapper started; stopping the device (cancelling ``run``) stops every
  wrapper and waits until each has closed its channel; starting it again starts them, each
  reopening its remembered offer over fresh memory;
- ``save_open`` returns :class:`RelaySavedState`: per intercepted channel its instance id, the
  intercepted device's blob and ``is_open`` false; ``restore_open`` hands each blob back to the
  wrapper of its instance id, and refuses a state that claims a channel was saved open
  (facts §10.1).

Client devices are intercepted whether or not this device is configured; without it their
wrappers simply stay started for the life of the host.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import anyio
import attrs

from devicehost import DeviceContext, LocalOffer, hookimpl
from devicehost.errors import ConfigError, SavedStateError
from devicehost.vmbus.guid import Guid
from devicehost_intercept.relay import ChannelRelay
from devicehost_intercept.state import (
    InterceptedChannel,
    RelaySavedState,
    decode_blob_untrusted,
    encode_blob,
)

__all__ = ["InterceptConfig", "InterceptRelay", "RelayRunner"]


@attrs.frozen
class InterceptConfig:
    """The relay device has nothing to configure: client devices claim their own channels."""


class RelayRunner:
    """The open relay device: the host's relay."""

    def __init__(self, relay: ChannelRelay) -> None:
        self.relay = relay

    async def run(self) -> None:
        await self.relay.start()
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await self.relay.stop()

    async def save(self) -> RelaySavedState:
        blobs = await self.relay.save()
        return RelaySavedState(tuple(
            InterceptedChannel(str(iid), encode_blob(blob), is_open=False)
            for iid, blob in blobs.items()
        ))

    async def restore(self, state: RelaySavedState) -> None:
        for channel in state.channels:
            if channel.is_open:
                raise SavedStateError(
                    f"intercepted channel {channel.instance_id} was saved open; an intercepted "
                    f"channel is always closed before saving, so this state is not ours")
        for channel in state.channels:
            try:
                instance_id = Guid.parse(channel.instance_id)
            except ValueError as exc:
                raise SavedStateError(
                    f"intercepted channel {channel.instance_id[:64]!r}: not a GUID") from exc
            await self.relay.restore(instance_id,
                                     decode_blob_untrusted(channel.intercepted_save_state))


class InterceptRelay:
    """The intercept relay of the host, as a local device."""

    config_class = InterceptConfig

    def __init__(self, config: InterceptConfig | None = None) -> None:
        self.config = config if config is not None else InterceptConfig()

    @staticmethod
    async def _relay(ctx: DeviceContext) -> ChannelRelay:
        if ctx.host is None:
            raise ConfigError(f"device {ctx.name!r}: the intercept relay needs a running host")
        from devicehost_intercept.transport import InterceptTransport

        relay: ChannelRelay = await ctx.host.transport(InterceptTransport).relay()
        return relay

    @hookimpl
    def offer(self, ctx: DeviceContext) -> LocalOffer:
        return LocalOffer({"role": "VMBus intercept relay"})

    @hookimpl
    async def open(self, ctx: DeviceContext, resources: Any) -> RelayRunner:
        return RelayRunner(await self._relay(ctx))

    @hookimpl
    def run(self, ctx: DeviceContext, runner: RelayRunner) -> Awaitable[None]:
        return runner.run()

    @hookimpl
    def close(self, ctx: DeviceContext, runner: RelayRunner, subchannel_index: int) -> None:
        return None  # the relay belongs to the host's intercept transport

    @hookimpl
    def save_open(self, ctx: DeviceContext, runner: RelayRunner) -> Awaitable[RelaySavedState]:
        return runner.save()

    @hookimpl
    async def restore_open(
        self, ctx: DeviceContext, state: RelaySavedState, resources: Any
    ) -> RelayRunner:
        runner = RelayRunner(await self._relay(ctx))
        await runner.restore(state)
        return runner

    @hookimpl
    def inspect(self, ctx: DeviceContext, runner: RelayRunner | None) -> dict[str, Any]:
        return {} if runner is None else runner.relay.inspect()

"""The relay: routing by instance id, hiding claimed offers, duplicate claims, start/stop."""

from __future__ import annotations

import anyio
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream

from devicehost.testing.registry import DeviceSpec
from devicehost.vmbus import IncomingOffer, VmbusTransport
from devicehost_intercept import InterceptTransport

from .harness import (
    ECHO_INSTANCE,
    OTHER_INSTANCE,
    EchoClient,
    EchoClientConfig,
    EchoServerConfig,
    channel_of,
    intercept_host,
    until,
    wrapper_of,
)

pytestmark = pytest.mark.anyio


async def _drain(stream: MemoryObjectReceiveStream[IncomingOffer]) -> list[IncomingOffer]:
    got = []
    while True:
        try:
            got.append(stream.receive_nowait())
        except anyio.WouldBlock:
            return got


async def test_claimed_offers_reach_only_their_wrapper_and_are_hidden_from_others() -> None:
    specs = [
        DeviceSpec("client", "echo-client", EchoClientConfig()),
        DeviceSpec("echo", "echo", EchoServerConfig()),
        DeviceSpec("other", "echo", EchoServerConfig(instance_id=str(OTHER_INSTANCE))),
    ]
    async with intercept_host(specs) as (host, _recorder):
        vmbus = host.transport(VmbusTransport)
        relay = await host.transport(InterceptTransport).relay()
        await until(lambda: wrapper_of(host, "client").channel is not None)
        # Another client of the host's VMBus sees only the unclaimed offer.
        bystander = vmbus.client()
        seen = await _drain(bystander.offers)
        assert [o.offer.instance_id for o in seen] == [OTHER_INSTANCE]
        # So does whoever the relay forwards unclaimed offers to.
        forwarded = await _drain(relay.subscribe())
        assert [o.offer.instance_id for o in forwarded] == [OTHER_INSTANCE]
        # The client device was offered only its own instance.
        device = host.devices["client"].pm.get_plugin("client")
        assert isinstance(device, EchoClient)
        assert [o.offer.instance_id for o in device.offers_seen] == [
            wrapper_of(host, "client").instance_id]
        # Once the claim goes, the instance's offers are announced to everyone again.
        await host.remove_device("client")
        await host.remove_device("echo")
        await host.add_device("echo-again", "echo", EchoServerConfig())
        with anyio.fail_after(5):
            fresh = await bystander.offers.receive()
        assert fresh.offer.instance_id == ECHO_INSTANCE


async def test_a_second_device_claiming_the_same_instance_is_a_config_error() -> None:
    specs = [DeviceSpec("a", "echo-client", EchoClientConfig()),
             DeviceSpec("b", "echo-client", EchoClientConfig())]
    async with intercept_host(specs) as (host, _recorder):
        assert "b" in host.failures
        assert "'a' and 'b' both intercept" in host.failures["b"]
        assert "a" not in host.failures


async def test_offer_present_before_the_claim_is_routed_when_the_device_is_added() -> None:
    specs = [DeviceSpec("echo", "echo", EchoServerConfig()),
             DeviceSpec("client", "echo-client", EchoClientConfig())]
    async with intercept_host(specs) as (host, _recorder):
        await until(lambda: host.devices["client"].runner is not None
                    and host.devices["client"].runner.rounds >= 1)


async def test_relay_stop_and_start_reach_every_wrapper() -> None:
    specs = [DeviceSpec("echo", "echo", EchoServerConfig()),
             DeviceSpec("other", "echo", EchoServerConfig(instance_id=str(OTHER_INSTANCE))),
             DeviceSpec("c1", "echo-client", EchoClientConfig()),
             DeviceSpec("c2", "echo-client", EchoClientConfig(instance_id=str(OTHER_INSTANCE)))]
    async with intercept_host(specs) as (host, _recorder):
        relay = await host.transport(InterceptTransport).relay()
        w1, w2 = wrapper_of(host, "c1"), wrapper_of(host, "c2")
        await until(lambda: w1.channel is not None and w2.channel is not None)
        with anyio.fail_after(10):
            await relay.stop()
        assert w1.channel is None and w2.channel is None and not relay.running
        assert set(await relay.save()) == {w1.instance_id, w2.instance_id}
        with anyio.fail_after(10):
            await relay.start()
        assert channel_of(w1) is not None and channel_of(w2) is not None
        assert await relay.restore(OTHER_INSTANCE, await w2.save())

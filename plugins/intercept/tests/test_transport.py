"""The intercept transport: the host maps InterceptClaim offers to it; add/remove/aclose."""

from __future__ import annotations

import sys

import pytest

from devicehost import ConfigError
from devicehost.testing.registry import DeviceSpec
from devicehost.transport import transport_class_for
from devicehost.vmbus import InterceptClaim
from devicehost_intercept import InterceptTransport

from .harness import ECHO_INSTANCE, EchoClientConfig, EchoServerConfig, intercept_host, until

pytestmark = pytest.mark.anyio


def test_the_host_maps_a_claim_to_this_transport() -> None:
    assert transport_class_for(InterceptClaim(ECHO_INSTANCE)) is InterceptTransport


def test_without_the_plugin_a_claim_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "devicehost_intercept.transport", None)
    with pytest.raises(ConfigError, match="install 'devicehost-intercept'"):
        transport_class_for(InterceptClaim(ECHO_INSTANCE))


async def test_add_refuses_what_is_not_a_claim_and_remove_revokes() -> None:
    specs = [DeviceSpec("echo", "echo", EchoServerConfig()),
             DeviceSpec("client", "echo-client", EchoClientConfig())]
    async with intercept_host(specs) as (host, _recorder):
        transport = host.transport(InterceptTransport)
        device = host.devices["client"]
        with pytest.raises(ConfigError, match="needs an InterceptClaim"):
            await transport.add(device, "not a claim")
        with pytest.raises(ConfigError, match="already intercepts"):
            await transport.add(device, InterceptClaim(ECHO_INSTANCE))
        await until(lambda: device.runner is not None)
        wrapper = transport.wrapper_of(device)
        await host.remove_device("client")
        assert wrapper.channel is None and wrapper.offer is None
        assert device.offer_value is None and device.runner is None
        with pytest.raises(KeyError):
            transport.wrapper_of(device)
        assert transport.inspect()["wrappers"] == []

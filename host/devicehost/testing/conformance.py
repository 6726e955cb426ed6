"""The device conformance suite: does a device honour the lifecycle contract?

Subclass :class:`DeviceConformance` in a test module of your plugin::

    from devicehost.testing import DeviceConformance
    from my_device import MyDevice

    class TestMyDeviceConformance(DeviceConformance):
        device_class = MyDevice

pytest then runs every ``test_*`` method below against a real host serving one instance of the
device, opened the way its guest would open it, on asyncio and on trio.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import anyio
import pytest

from devicehost.context import DeviceContext
from devicehost.host import Host
from devicehost.lifecycle import Device, DeviceState, new_device_manager
from devicehost.testing.guest import guest_session
from devicehost.testing.registry import DeviceSpec, host_with
from devicehost.transport import transport_class_for

__all__ = ["DeviceConformance"]

#: Seconds any single lifecycle step may take before the suite calls it a hang.
STEP_TIMEOUT = 10.0


@pytest.mark.anyio
class DeviceConformance:
    """Lifecycle contract checks, run against ``device_class`` built with ``config``."""

    device_class: ClassVar[type[Any]]
    #: The config value; None means ``device_class.config_class()`` (or None without one).
    config: ClassVar[Any] = None
    plugin_name: ClassVar[str] = "device-under-test"
    #: Devices served beside the device under test, by plugin name: (device class, config).
    #: A VMBus client device needs the server device whose offer it intercepts.
    peers: ClassVar[Mapping[str, tuple[type[Any], Any]]] = {}

    @pytest.fixture(params=["asyncio", "trio"])
    def anyio_backend(self, request: pytest.FixtureRequest) -> str:
        return str(request.param)

    def make_config(self) -> Any:
        if self.config is not None:
            return self.config
        config_class = getattr(self.device_class, "config_class", None)
        return None if config_class is None else config_class()

    @asynccontextmanager
    async def opened(self) -> AsyncIterator[tuple[Host, Device, Any]]:
        """A host serving the device, opened by its guest; yields (host, device, guest)."""
        specs = [DeviceSpec(name, name, config) for name, (_cls, config) in self.peers.items()]
        specs.append(DeviceSpec("dut", self.plugin_name, self.make_config()))
        classes = {name: cls for name, (cls, _config) in self.peers.items()}
        classes[self.plugin_name] = self.device_class
        async with host_with(classes, specs) as host:
            assert "dut" not in host.failures, f"the device was not served: {host.failures}"
            device = host.devices["dut"]
            with anyio.fail_after(STEP_TIMEOUT):
                async with guest_session(host, device) as guest:
                    await _wait_for(lambda: _state(device) is DeviceState.RUNNING)
                    yield host, device, guest

    # -- the checks --------------------------------------------------------------------------------

    def test_hookimpls_match_specs(self) -> None:
        new_device_manager(self.device_class, self.plugin_name).check_pending()

    async def test_offer_is_valid_and_stable(self) -> None:
        async with self.opened() as (_host, device, _guest):
            first = device.offer_value
            transport_class_for(first)  # raises if no transport serves it
            again = device.pm.hook.offer(ctx=device.ctx, incoming=None)
            assert again == first, "offer must describe the same thing every time it is called"

    async def test_open_run_stop_start_close(self) -> None:
        async with self.opened() as (_host, device, _guest):
            runner = device.runner
            assert runner is not None
            assert device.run_count == 1
            with anyio.fail_after(STEP_TIMEOUT):
                assert await device.stop(), "stop of a running device must report it was running"
            assert _state(device) is DeviceState.OPEN
            assert device.runner is runner, "stop must keep the runner"
            with anyio.fail_after(STEP_TIMEOUT):
                assert await device.start()
            assert _state(device) is DeviceState.RUNNING
            assert device.run_count == 2 and device.runner is runner
            with anyio.fail_after(STEP_TIMEOUT):
                await device.close()
            assert _state(device) is DeviceState.CLOSED and device.runner is None

    async def test_stop_cancels_run_promptly(self) -> None:
        async with self.opened() as (_host, device, _guest):
            for _ in range(5):
                await anyio.sleep(0)
                with anyio.fail_after(STEP_TIMEOUT):
                    await device.stop()
                assert _state(device) is DeviceState.OPEN, device.failure
                with anyio.fail_after(STEP_TIMEOUT):
                    await device.start()
            assert device.failure is None

    async def test_transport_close_and_reopen(self) -> None:
        """The transport's own contract: the guest closes the device and opens it again."""
        instance = self.device_class(self.make_config())
        pm = new_device_manager(instance, self.plugin_name)
        kind = type(pm.hook.offer(ctx=_bare_ctx(self.plugin_name, self.make_config()),
                                  incoming=None)).__qualname__
        if kind == "OfferParams":
            from devicehost.testing.vmbus import check_vmbus_device

            await check_vmbus_device(self.device_class, self.make_config())
            return
        async with self.opened() as (host, device, guest):
            if kind == "DeviceTraits":
                from devicehost.virtio.transport import VirtioTransport

                with anyio.fail_after(STEP_TIMEOUT):
                    await guest.reset()
                assert _state(device) is DeviceState.CLOSED and device.runner is None
                with anyio.fail_after(STEP_TIMEOUT):
                    driver = await host.transport(VirtioTransport).connect_driver(device.name)
                    await _wait_for(lambda: _state(device) is DeviceState.RUNNING)
                    await driver.reset()
                assert _state(device) is DeviceState.CLOSED
            else:
                with anyio.fail_after(STEP_TIMEOUT):
                    await host.remove_device(device.name)
                assert _state(device) is DeviceState.REVOKED and device.runner is None

    async def test_save_restore_round_trip(self) -> None:
        supported = True
        async with self.opened() as (host, device, _guest):
            with anyio.fail_after(STEP_TIMEOUT):
                await device.stop()
            state = await device.save()
            if state is not None:
                await self._check_round_trip(host, device, state)
            else:
                supported = False
        if not supported:
            # Skipped outside the host's task group, so the skip is not wrapped in a group.
            pytest.skip("the device does not support save/restore (save_open returned None)")

    async def _check_round_trip(self, host: Host, device: Device, state: Any) -> None:
        from devicehost.savedstate import (
            decode_envelope_untrusted,
            decode_state_untrusted,
            encode_envelope,
            entry_for,
        )

        blob = encode_envelope([entry_for(device.name, device.ctx.plugin, state)])
        (entry,) = decode_envelope_untrusted(blob)
        restored = decode_state_untrusted(entry, type(state))
        assert restored == state, "a saved state must survive encoding unchanged"
        reopen = getattr(host.transport_of(device.name), "resources_for_restore", None)
        if reopen is None:
            return
        resources = reopen(device)
        device.forget_runner()
        with anyio.fail_after(STEP_TIMEOUT):
            await device.restore(restored, resources)
            assert await device.start()
        assert _state(device) is DeviceState.RUNNING


def _bare_ctx(name: str, config: Any) -> DeviceContext:
    return DeviceContext(name=name, plugin=name, config=config,
                         logger=logging.getLogger(f"devicehost.device.{name}"))


async def _wait_for(predicate: Any, interval: float = 0.005) -> None:
    while not predicate():
        await anyio.sleep(interval)


def _state(device: Device) -> DeviceState:
    # Read afresh: the state changes across awaits, which type narrowing does not know.
    return device.state

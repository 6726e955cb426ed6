"""The sidecar as a device: driven through lifecycle.Device, through a real host (test kit), and
by the test kit's conformance suite."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import attrs
import pytest

from devicehost import ConfigError, DeviceContext, DeviceError, DeviceState, LocalOffer
from devicehost.lifecycle import Device, new_device_manager
from devicehost.testing import DeviceConformance, host_with
from devicehost.testing.registry import DeviceSpec
from devicehost_sidecar import (
    SidecarClient,
    SidecarConfig,
    SidecarDevice,
    SidecarProtocolError,
    SimulatedSidecar,
    VpScript,
)
from devicehost_sidecar.protocol import CpuStatus

TIMEOUT = 5.0


class TestSidecarConformance(DeviceConformance):
    device_class = SidecarDevice


def _state(managed: Device) -> DeviceState:
    """The device's state now: read through a call, so that a check made before a stop or start
    does not narrow the checks made after it."""
    return managed.state


@asynccontextmanager
async def lifecycle(config: SidecarConfig) -> AsyncIterator[tuple[SidecarDevice, Device]]:
    device = SidecarDevice(config)
    ctx = DeviceContext("sidecar0", "sidecar", config, logging.getLogger("test.sidecar"))
    async with anyio.create_task_group() as tg:
        managed = Device(ctx, new_device_manager(device, ctx.name), tg)
        with anyio.fail_after(TIMEOUT):
            yield device, managed
            await managed.close()


@pytest.mark.anyio
async def test_offer_open_run_close_through_the_lifecycle() -> None:
    async with lifecycle(SidecarConfig(nodes=3, cpus_per_node=2, intercept_after=2)) as (
        device,
        managed,
    ):
        offer = await managed.offer()
        assert offer == LocalOffer(
            {
                "driver": "simulator",
                "nodes": [
                    {"index": 0, "base_cpu": 0, "cpu_count": 2},
                    {"index": 1, "base_cpu": 2, "cpu_count": 2},
                    {"index": 2, "base_cpu": 4, "cpu_count": 2},
                ],
                "cpus": 6,
            }
        )
        client = await managed.open(offer)
        assert isinstance(client, SidecarClient) and _state(managed) is DeviceState.RUNNING
        with client.vp(5) as vp:
            async with vp.run() as run:
                assert await run.wait() is True  # the device's wait loops woke us
        tree = await managed.inspect()
        assert tree["device"]["driver"] == "simulator"
        assert tree["device"]["stats"]["intercepts"] == 1
        assert await managed.stop() and _state(managed) is DeviceState.OPEN
        assert await managed.save() is None  # not supported: revoked and re-offered on restore
        assert await managed.start()
        with client.vp(0) as vp:
            async with vp.run() as run:
                assert await run.wait() is True  # new wait loops after the restart
        sim = device.driver
        assert isinstance(sim, SimulatedSidecar)
        await managed.close()
        assert managed.state is DeviceState.CLOSED
        # close unmapped the nodes and removed the simulated CPUs
        statuses = [node.cpu_status(cpu) for node in sim.nodes for cpu in node.info.cpus]
        assert statuses == [CpuStatus.REMOVED] * 6


def test_kernel_driver_without_a_sidecar_is_a_config_error_naming_the_key(
    tmp_path: Path,
) -> None:
    prefix = str(tmp_path / "mshv_vtl_sidecar")
    with pytest.raises(ConfigError) as info:
        SidecarDevice(SidecarConfig(driver="kernel", device_prefix=prefix))
    assert info.value.keyed() == (
        f"key 'driver' = 'kernel': no sidecar on this machine: {prefix}0 does not exist"
        ' (configure driver = "simulator" to use the simulated sidecar)')


@pytest.mark.anyio
async def test_kernel_driver_whose_sidecar_is_gone_at_offer_fails_only_this_device(
    tmp_path: Path,
) -> None:
    node = tmp_path / "mshv_vtl_sidecar0"
    node.write_bytes(b"")
    config = SidecarConfig(driver="kernel", device_prefix=str(tmp_path / "mshv_vtl_sidecar"))
    async with lifecycle(config) as (_device, managed):
        node.unlink()
        with pytest.raises(DeviceError, match=r"no sidecar on this machine: .*sidecar0"):
            await managed.offer()
        assert managed.state is DeviceState.FAILED
        assert managed.failure is not None and "SidecarUnavailableError" in managed.failure


@pytest.mark.anyio
async def test_hostile_completion_fails_the_device_not_the_host() -> None:
    async with lifecycle(SidecarConfig(nodes=1, cpus_per_node=1)) as (device, managed):
        await managed.open(await managed.offer())
        assert isinstance(device.driver, SimulatedSidecar)
        client = managed.runner
        device.driver.vps[0].script = VpScript(intercept_after=None)
        with client.vp(0) as vp:
            async with vp.run() as run:
                device.driver.nodes[0].post_completion(b"\x07\x00\x00\x00")
                with pytest.raises(SidecarProtocolError, match="CPU 7"):
                    await run.wait()  # woken by the failing wait loop
        await anyio.wait_all_tasks_blocked()  # the run task has ended
        assert managed.state is DeviceState.FAILED
        assert managed.failure is not None
        assert "SidecarProtocolError" in managed.failure and "CPU 7" in managed.failure


@pytest.mark.anyio
async def test_other_code_reaches_the_client_through_the_host() -> None:
    spec = DeviceSpec("sc", "sidecar", SidecarConfig(nodes=2, cpus_per_node=1))
    async with host_with({"sidecar": SidecarDevice}, [spec]) as host:
        device = host.devices["sc"]
        assert device.state is DeviceState.RUNNING
        with anyio.fail_after(TIMEOUT):
            client = device.runner
            assert isinstance(client, SidecarClient) and client.cpus == [0, 1]
            with client.vp(1) as vp:
                vp.set_vp_registers({0x20000: 42})
                assert vp.get_vp_registers([0x20000]) == [42]


def test_config_defaults_and_validation() -> None:
    config = SidecarConfig()
    assert attrs.asdict(config) == {
        "driver": "simulator",
        "nodes": 2,
        "cpus_per_node": 2,
        "device_prefix": "/dev/mshv_vtl_sidecar",
        "intercept_after": 100,
        "intercept_port": 0x3F8,
    }
    for bad in (
        {"driver": "qemu"},
        {"nodes": 0},
        {"nodes": 129},
        {"cpus_per_node": 0},
        {"intercept_port": 0x10000},
        {"intercept_after": -1},
        {"device_prefix": ""},
    ):
        with pytest.raises((ValueError, TypeError)):
            SidecarConfig(**bad)


def test_config_reaches_the_simulator() -> None:
    device = SidecarDevice(SidecarConfig(nodes=1, cpus_per_node=3, intercept_port=0x80))
    sim = device.driver
    assert isinstance(sim, SimulatedSidecar)
    assert [info.cpu_count for info in sim.infos] == [3]
    assert sim.vps[2].script == VpScript(intercept_after=100, port=0x80)
    assert SidecarDevice().config == SidecarConfig()


def test_config_table_is_structured_by_the_host_with_precise_errors() -> None:
    from devicehost import ConfigError
    from devicehost.config import structure

    config = structure(SidecarConfig, {"driver": "kernel", "nodes": 3}, "devices.sc")
    assert config == SidecarConfig(driver="kernel", nodes=3)
    with pytest.raises(ConfigError, match=r"devices\.sc: key 'nodes'.*>= 1"):
        structure(SidecarConfig, {"nodes": 0}, "devices.sc")
    with pytest.raises(ConfigError, match=r"key 'driver'.*'qemu'"):
        structure(SidecarConfig, {"driver": "qemu"}, "devices.sc")

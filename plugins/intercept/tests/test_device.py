"""The ``intercept`` relay device: discovery, stop/start of every wrapper, save/restore."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from devicehost import SavedStateError
from devicehost.lifecycle import DeviceState
from devicehost.plugins import list_plugins, load_plugins
from devicehost.savedstate import (
    decode_envelope_untrusted,
    decode_state_untrusted,
    encode_envelope,
    entry_for,
)
from devicehost.testing.registry import DeviceSpec
from devicehost_intercept import InterceptConfig, InterceptRelay, RelaySavedState
from devicehost_intercept.state import InterceptedChannel, decode_blob_untrusted, encode_blob

from .harness import (
    ECHO_INSTANCE,
    EchoClientConfig,
    EchoServerConfig,
    EchoState,
    intercept_host,
    until,
    wrapper_of,
)

pytestmark = pytest.mark.anyio

SPECS = [DeviceSpec("relay", "intercept", InterceptConfig()),
         DeviceSpec("echo", "echo", EchoServerConfig()),
         DeviceSpec("client", "echo-client", EchoClientConfig())]


def test_the_host_discovers_the_plugin() -> None:
    (info,) = [i for i in list_plugins(environ={}) if i.name == "intercept"]
    assert info.distribution == "devicehost-intercept"
    assert info.status == "available"
    registry = load_plugins(["intercept"], environ={"DEVICEHOST_LOAD_PLUGINS": "intercept"})
    assert registry.device_classes["intercept"] is InterceptRelay


async def test_stopping_the_relay_device_stops_every_wrapper_and_starting_reopens() -> None:
    async with intercept_host(SPECS) as (host, _recorder):
        relay, wrapper = host.devices["relay"], wrapper_of(host, "client")
        assert relay.state is DeviceState.RUNNING
        await until(lambda: host.devices["client"].runner is not None
                    and host.devices["client"].runner.rounds >= 2)
        with anyio.fail_after(10):
            assert await relay.stop()
        assert wrapper.channel is None and not wrapper.started
        assert isinstance(wrapper.stash, EchoState)
        with anyio.fail_after(10):
            assert await relay.start()
        await until(lambda: wrapper.channel is not None)
        assert host.devices["client"].runner.restored_from is not None


async def test_relay_save_and_restore_round_trip_through_the_envelope() -> None:
    async with intercept_host(SPECS) as (host, _recorder):
        relay, wrapper = host.devices["relay"], wrapper_of(host, "client")
        await until(lambda: host.devices["client"].runner is not None
                    and host.devices["client"].runner.rounds >= 2)
        await relay.stop()
        stashed = wrapper.stash
        state = await relay.save()
        assert isinstance(state, RelaySavedState)
        (channel,) = state.channels
        assert channel.instance_id == str(ECHO_INSTANCE) and channel.is_open is False
        blob = decode_blob_untrusted(channel.intercepted_save_state)
        assert decode_state_untrusted(blob, EchoState) == stashed
        data = encode_envelope([entry_for("relay", "intercept", state)])
        (entry,) = decode_envelope_untrusted(data)
        restored = decode_state_untrusted(entry, RelaySavedState)
        assert restored == state

        wrapper.stash = None
        relay.forget_runner()
        await relay.restore(restored, None)
        assert wrapper.stash == stashed
        assert await relay.start()
        # The wrapper gets its channel before the client device it wraps is opened on it.
        await until(lambda: host.devices["client"].runner is not None)
        assert host.devices["client"].runner.restored_from == stashed.rounds


async def test_relay_restore_refuses_a_channel_saved_open() -> None:
    async with intercept_host(SPECS) as (host, _recorder):
        relay = host.devices["relay"]
        await relay.stop()
        blob = encode_blob(entry_for("client", "echo-client", EchoState(1)))
        bad = RelaySavedState((InterceptedChannel(str(ECHO_INSTANCE), blob, is_open=True),))
        relay.forget_runner()
        with pytest.raises(Exception, match="saved open"):
            await relay.restore(bad, None)
        assert relay.state is DeviceState.FAILED
        assert "saved open" in (relay.failure or "")
        garbled = RelaySavedState((InterceptedChannel(str(ECHO_INSTANCE), b"{not json"),))
        with pytest.raises(Exception, match="not valid JSON"):
            await relay.restore(garbled, None)


def test_saved_open_is_a_saved_state_error() -> None:
    from devicehost_intercept.device import RelayRunner

    runner = RelayRunner(relay=None)  # type: ignore[arg-type]  # no relay: the check comes first
    bad = RelaySavedState((InterceptedChannel(str(ECHO_INSTANCE), b"", is_open=True),))
    with pytest.raises(SavedStateError, match="saved open"):
        anyio.run(runner.restore, bad)


async def test_host_save_and_restore_resume_the_client_from_the_relay_state(
    tmp_path: Path,
) -> None:
    import attrs

    from devicehost.host import open_host
    from devicehost.testing import StaticRegistry
    from devicehost_vmbfs import VmbfsConfig, VmbfsDevice
    from devicehost_vmbfs.client_device import VmbfsClientConfig, VmbfsClientDevice

    @attrs.frozen
    class Config:
        devices: tuple[DeviceSpec, ...]

    content = os.urandom(120_000)
    (tmp_path / "hive").write_bytes(content)
    chunk = 2048
    config = Config((
        DeviceSpec("relay", "intercept", InterceptConfig()),
        DeviceSpec("imc", "vmbfs", VmbfsConfig(file=str(tmp_path / "hive"))),
        DeviceSpec("reader", "vmbfs-client", VmbfsClientConfig(chunk=chunk)),
    ))
    registry = StaticRegistry({"intercept": InterceptRelay, "vmbfs": VmbfsDevice,
                               "vmbfs-client": VmbfsClientDevice})
    async with open_host(registry, config, guest_memory_size=4 << 20) as host:
        reader = host.devices["reader"]
        await until(lambda: reader.runner is not None
                    and len(reader.runner.reader.received) >= 10 * chunk)
        await host.devices["imc"].stop()  # hold the server back: the read is mid-file
        with anyio.fail_after(10):
            data = await host.save()
        stash = wrapper_of(host, "reader").stash
        kept = len(stash.received)
        assert 0 < kept < len(content)

    async with open_host(registry, config, saved=data, guest_memory_size=4 << 20) as host:
        assert host.restore_report["relay"] == "restored"
        reader, server = host.devices["reader"], host.devices["imc"]
        await until(lambda: reader.runner is not None and reader.runner.finished.is_set())
        assert reader.runner.files[0].data == content
        # The server saw the resumed client: version, file info, then only the missing reads.
        assert server.runner.core.messages == 2 + -(-(len(content) - kept) // chunk)

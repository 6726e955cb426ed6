"""The intercept wrapper, observed at the VMBus server: GPADL, open, ring split, stop/start,
revoke, leaked pages, extra offers, save/restore blobs (facts §10.3, §10.4)."""

from __future__ import annotations

import logging
from typing import Any, TypeVar

import anyio
import attrs
import pytest

from devicehost.host import Host
from devicehost.lifecycle import DeviceState
from devicehost.savedstate import NoSavedState, entry_for
from devicehost.testing.registry import DeviceSpec
from devicehost.vmbus import (
    GpadlRequest,
    IncomingOffer,
    OpenData,
    RawChannel,
    RingMemory,
    VmbusTransport,
)
from devicehost.vmbus.protocol import (
    CloseRequest,
    GpadlChannelRequest,
    OpenChannelRequest,
    TeardownGpadlRequest,
)
from devicehost_intercept import InterceptWrapper
from devicehost_intercept.state import blob_for

from .harness import (
    EchoClient,
    EchoClientConfig,
    EchoClientRunner,
    EchoServer,
    EchoServerConfig,
    EchoState,
    OtherState,
    Recorder,
    channel_of,
    intercept_host,
    stash_of,
    until,
    wrapper_of,
)

pytestmark = pytest.mark.anyio

_P = TypeVar("_P")

ECHO = DeviceSpec("echo", "echo", EchoServerConfig())
CLIENT = DeviceSpec("client", "echo-client", EchoClientConfig())


def _plugin(host: Host, name: str, kind: type[_P]) -> _P:
    """The device object (``kind``) of device ``name``."""
    plugin = host.devices[name].pm.get_plugin(name)
    assert isinstance(plugin, kind)
    return plugin


def _expect_setup(recorder: Recorder, channel_id: int, pfns: tuple[int, ...]) -> None:
    """The exact GPADL and open an intercepted channel over ``pfns`` is set up with."""
    assert [(c, type(r)) for c, r in recorder.requests] == [
        (channel_id, GpadlChannelRequest), (channel_id, OpenChannelRequest)]
    (gpadl,) = recorder.of(GpadlChannelRequest)
    assert gpadl.request == GpadlRequest(id=pfns[1], count=1, buf=(16384, *pfns))
    (opened,) = recorder.of(OpenChannelRequest)
    assert opened.request.open_data == OpenData(
        ring_offset=2, ring_gpadl_id=pfns[1], target_vp=0, event_flag=0xFFFF,
        connection_id=0xFFFFFFFF, user_data=bytes(120))


def _data(mem: RingMemory) -> memoryview:
    """The data area of a ring of one data page (one view: it is contiguous)."""
    assert mem.data is not None
    return mem.data


def _expect_ring_split(host: Host, wrapper: InterceptWrapper, server_channel: RawChannel) -> None:
    """Outgoing ring = pages 0-1, incoming = pages 2-3, as both ends map them."""
    memory = host.guest_memory
    channel = wrapper.channel
    assert channel is not None
    pfns = channel.block.pfns
    assert pfns == tuple(range(pfns[0], pfns[0] + 4))
    for i, pfn in enumerate(pfns):
        memory.write(pfn * 4096 + 2048, bytes([0xA0 + i]) * 4)
    client = channel.channel
    # The control page of each ring is its first page; the data page follows.
    assert bytes(client.outgoing.mem.control[2048:2052]) == b"\xa0" * 4
    assert bytes(_data(client.outgoing.mem)[2048:2052]) == b"\xa1" * 4
    assert bytes(client.incoming.mem.control[2048:2052]) == b"\xa2" * 4
    assert bytes(_data(client.incoming.mem)[2048:2052]) == b"\xa3" * 4
    assert bytes(server_channel.incoming.mem.control[2048:2052]) == b"\xa0" * 4
    assert bytes(_data(server_channel.incoming.mem)[2048:2052]) == b"\xa1" * 4
    assert bytes(server_channel.outgoing.mem.control[2048:2052]) == b"\xa2" * 4
    assert bytes(_data(server_channel.outgoing.mem)[2048:2052]) == b"\xa3" * 4


def _client_runner(host: Host, name: str = "client") -> EchoClientRunner | None:
    """The runner of echo client ``name`` (None while it is not open)."""
    runner = host.devices[name].runner
    assert runner is None or isinstance(runner, EchoClientRunner)
    return runner


async def _echoing(host: Host, name: str = "client") -> EchoClientRunner:
    await until(lambda: host.devices[name].runner is not None
                and host.devices[name].runner.rounds >= 2)
    runner = _client_runner(host, name)
    assert runner is not None
    return runner


async def test_first_offer_gpadl_open_and_ring_split() -> None:
    async with intercept_host([ECHO, CLIENT]) as (host, recorder):
        wrapper = wrapper_of(host, "client")
        await _echoing(host)
        channel = wrapper.channel
        assert channel is not None
        handle = host.transport(VmbusTransport).handle_of(host.devices["echo"])
        _expect_setup(recorder, handle.channel_id, channel.block.pfns)
        server = _plugin(host, "echo", EchoServer)
        (resources,) = server.opens
        assert resources.request.open_data.ring_offset == 2
        _expect_ring_split(host, wrapper, resources.channel)
        allocator = host.transport(VmbusTransport).allocator
        assert all(allocator.in_use(pfn) for pfn in channel.block.pfns)


async def test_stop_then_start_closes_tears_down_stashes_and_reopens() -> None:
    async with intercept_host([ECHO, CLIENT]) as (host, recorder):
        wrapper = wrapper_of(host, "client")
        runner = await _echoing(host)
        first = wrapper.channel
        assert first is not None
        handle = host.transport(VmbusTransport).handle_of(host.devices["echo"])
        recorder.clear()
        with anyio.fail_after(10):
            await wrapper.stop()
        assert [(c, type(r)) for c, r in recorder.requests] == [
            (handle.channel_id, CloseRequest), (handle.channel_id, TeardownGpadlRequest)]
        assert recorder.of(TeardownGpadlRequest)[0].id == first.block.pfns[1]
        assert wrapper.channel is None and wrapper.offer is not None
        assert wrapper.stash == EchoState(runner.rounds)
        client = _plugin(host, "client", EchoClient)
        assert client.closes == [0] and host.devices["client"].runner is None
        allocator = host.transport(VmbusTransport).allocator
        assert not any(allocator.in_use(pfn) for pfn in first.block.pfns)
        assert not handle.is_open

        recorder.clear()
        with anyio.fail_after(10):
            await wrapper.start()
        second = channel_of(wrapper)
        assert second is not None
        _expect_setup(recorder, handle.channel_id, second.block.pfns)
        server = _plugin(host, "echo", EchoServer)
        assert len(server.opens) == 2
        _expect_ring_split(host, wrapper, server.opens[-1].channel)
        restored = _client_runner(host)
        assert restored is not None
        assert restored is not runner and restored.restored_from == runner.rounds
        assert wrapper.stash is None  # consumed by restore_open
        await until(lambda: restored.rounds >= runner.rounds + 2)


async def test_revoke_closes_and_forgets_the_offer() -> None:
    async with intercept_host([ECHO, CLIENT]) as (host, recorder):
        wrapper = wrapper_of(host, "client")
        await _echoing(host)
        channel = wrapper.channel
        assert channel is not None
        transport = host.transport(VmbusTransport)
        handle = transport.handle_of(host.devices["echo"])
        recorder.clear()
        with anyio.fail_after(10):
            await transport.remove(host.devices["echo"])
            await until(lambda: wrapper.offer is None)
        # The server closed the channel and dropped the GPADL already; the wrapper still
        # tears its GPADL down (refused: the channel is gone) and frees the pages.
        assert recorder.requests == [(handle.channel_id, TeardownGpadlRequest(channel.gpadl_id))]
        assert wrapper.channel is None and wrapper.stash is None
        assert host.devices["client"].runner is None
        assert _plugin(host, "client", EchoClient).closes == [0]
        assert not any(transport.allocator.in_use(pfn) for pfn in channel.block.pfns)
        assert not handle.is_open
        # Start has no offer to open any more.
        await wrapper.stop()
        await wrapper.start()
        assert wrapper.channel is None and len(recorder.requests) == 1

        # A new offer of the instance is intercepted afresh, with the same layout.
        await host.remove_device("echo")
        recorder.clear()
        await host.add_device("echo2", "echo", EchoServerConfig())
        await until(lambda: wrapper.channel is not None)
        again = transport.handle_of(host.devices["echo2"])
        assert again.channel_id != handle.channel_id
        reopened = channel_of(wrapper)
        assert reopened is not None
        _expect_setup(recorder, again.channel_id, reopened.block.pfns)


async def test_failed_gpadl_teardown_leaks_pages_and_later_opens_get_new_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with intercept_host([ECHO, CLIENT]) as (host, recorder):
        wrapper = wrapper_of(host, "client")
        await _echoing(host)
        first = wrapper.channel
        assert first is not None
        allocator = host.transport(VmbusTransport).allocator
        recorder.refuse = lambda r: isinstance(r, TeardownGpadlRequest)
        with caplog.at_level(logging.ERROR), anyio.fail_after(10):
            await wrapper.stop()
        assert any("stay in use for good" in r.getMessage() and r.levelno == logging.ERROR
                   for r in caplog.records)
        assert set(first.block.pfns) <= allocator.leaked
        assert all(allocator.in_use(pfn) for pfn in first.block.pfns)
        recorder.refuse = lambda r: False
        recorder.clear()
        with anyio.fail_after(10):
            await wrapper.start()
        second = wrapper.channel
        assert second is not None
        assert not set(second.block.pfns) & set(first.block.pfns)
        _expect_setup(recorder, second.channel_id, second.block.pfns)
        await _echoing(host)
        # A stop that tears down cleanly frees the new pages; the leaked ones stay leaked.
        await wrapper.stop()
        assert not any(allocator.in_use(pfn) for pfn in second.block.pfns)
        assert all(allocator.in_use(pfn) for pfn in first.block.pfns)


async def test_extra_offer_while_open_is_ignored_and_undedicated_offer_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with intercept_host([ECHO, CLIENT]) as (host, recorder):
        wrapper = wrapper_of(host, "client")
        await _echoing(host)
        current = wrapper.channel
        assert current is not None and wrapper.offer is not None
        client = _plugin(host, "client", EchoClient)
        seen = len(client.offers_seen)
        extra = IncomingOffer(wrapper.offer.offer, "echo", anyio.Event())
        recorder.clear()
        await wrapper.handle_offer(extra)
        assert wrapper.channel is current and recorder.requests == []
        assert len(client.offers_seen) == seen  # the device was not even asked

        await wrapper.stop()
        undedicated = IncomingOffer(
            type(wrapper.offer.offer)(**{**_fields(wrapper.offer.offer), "is_dedicated": 0}),
            "echo", wrapper.offer.revoked)
        with caplog.at_level(logging.WARNING):
            await wrapper.handle_offer(undedicated)
        assert any("not dedicated" in r.getMessage() for r in caplog.records)
        assert wrapper.offer is undedicated and channel_of(wrapper) is None  # stopped: remembered
        await wrapper.start()
        assert wrapper.channel is not None


def _fields(value: attrs.AttrsInstance) -> dict[str, Any]:
    return attrs.asdict(value, recurse=False)


async def test_device_answering_ignore_gets_no_channel() -> None:
    ignoring = DeviceSpec("client", "echo-client", EchoClientConfig(answer="ignore"))
    async with intercept_host([ECHO, ignoring]) as (host, recorder):
        client = _plugin(host, "client", EchoClient)
        await until(lambda: len(client.offers_seen) == 1)
        await anyio.sleep(0.01)
        assert wrapper_of(host, "client").channel is None and recorder.requests == []
        assert wrapper_of(host, "client").offer is None


async def test_save_returns_the_stash_and_restore_checks_its_type(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with intercept_host([ECHO, CLIENT]) as (host, _recorder):
        wrapper = wrapper_of(host, "client")
        nothing = await wrapper.save()
        assert (nothing.type_name, nothing.payload) == ("save_restore.NoSavedState", {})
        runner = await _echoing(host)
        await wrapper.stop()
        blob = await wrapper.save()
        assert (blob.type_name, blob.type_version) == ("intercepttest.EchoState", 1)
        assert blob.payload == {"rounds": runner.rounds}
        assert await wrapper.save() == blob  # still stashed

        with caplog.at_level(logging.ERROR):
            await wrapper.restore(blob_for("client", "echo-client", OtherState(3)))
        assert stash_of(wrapper) is None
        assert any("rejected" in r.getMessage() and r.levelno == logging.ERROR
                   for r in caplog.records)

        await wrapper.restore(entry_for("client", "echo-client", EchoState(41)))
        assert wrapper.stash == EchoState(41)
        await wrapper.restore(entry_for("client", "echo-client", NoSavedState()))
        assert wrapper.stash is None

        await wrapper.restore(entry_for("client", "echo-client", EchoState(41)))
        await wrapper.start()
        assert host.devices["client"].runner.restored_from == 41


async def test_failing_save_open_still_closes_and_reopens_fresh() -> None:
    failing = DeviceSpec("client", "echo-client", EchoClientConfig(fail_in="save_open"))
    async with intercept_host([ECHO, failing]) as (host, _recorder):
        wrapper = wrapper_of(host, "client")
        await _echoing(host)
        await wrapper.stop()
        assert wrapper.channel is None and wrapper.stash is None
        assert host.devices["client"].runner is None
        await wrapper.start()
        runner = await _echoing(host)
        assert runner.restored_from is None
        assert host.devices["client"].state is DeviceState.RUNNING


@pytest.mark.parametrize("refused", [GpadlChannelRequest, OpenChannelRequest])
async def test_a_refused_gpadl_or_open_is_logged_and_frees_the_pages(
    caplog: pytest.LogCaptureFixture, refused: type,
) -> None:
    async with intercept_host([ECHO]) as (host, recorder):
        recorder.refuse = lambda r: isinstance(r, refused)
        with caplog.at_level(logging.ERROR):
            await host.add_device("client", "echo-client", EchoClientConfig())
            wrapper = wrapper_of(host, "client")
            await until(lambda: recorder.of(refused))
            await until(lambda: any("refused by the server" in r.getMessage()
                                    for r in caplog.records))
        assert wrapper.channel is None and host.devices["client"].runner is None
        allocator = host.transport(VmbusTransport).allocator
        assert allocator.free_pages == host.guest_memory.size // 4096
        assert _plugin(host, "client", EchoClient).closes == []  # never opened
        recorder.refuse = lambda r: False
        await wrapper.stop()
        await wrapper.start()
        await _echoing(host)


async def test_inspect_shows_the_wrapper_and_its_channel() -> None:
    async with intercept_host([DeviceSpec("relay", "intercept", None), ECHO, CLIENT]) as (
        host, _recorder):
        wrapper = wrapper_of(host, "client")
        await _echoing(host)
        tree = await host.devices["relay"].inspect()
        (shown,) = tree["device"]["wrappers"]
        assert shown["device"] == "client" and shown["started"] is True
        channel = wrapper.channel
        assert channel is not None
        assert shown["channel"]["gpadl_id"] == channel.gpadl_id
        assert shown["channel"]["pages"] == [f"{p:#x}" for p in channel.block.pfns]

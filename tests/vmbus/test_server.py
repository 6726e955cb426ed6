"""The in-process VMBus server: offers, GPADLs, the ring split, open/close, revoke, restore."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost.memory import PAGE_SIZE, GuestMemory
from devicehost.vmbus.channel import connected_signals, raw_channel_from_rings
from devicehost.vmbus.guid import Guid
from devicehost.vmbus.protocol import (
    STATUS_UNSUCCESSFUL,
    CloseRequest,
    DeviceChannel,
    GpadlChannelRequest,
    GpadlRequest,
    ModifyChannelRequest,
    ModifyRequest,
    OfferFlags,
    OfferParams,
    OpenChannelRequest,
    OpenData,
    OpenRequest,
    OpenResources,
    RestoreRequest,
    RevokeRequest,
    TeardownGpadlRequest,
)
from devicehost.vmbus.ring import RingEmpty, RingMemory
from devicehost.vmbus.server import (
    ChannelRequestError,
    OfferError,
    ServerSavedState,
    VmbusServer,
)

pytestmark = pytest.mark.anyio

IFACE = Guid.parse("11111111-2222-3333-4444-555555555555")
INST = Guid.parse("66666666-7777-8888-9999-aaaaaaaaaaaa")
MEMORY_PAGES = 256


class FakeDevice:
    """Records what the server asks of it; can be told to fail its open."""

    def __init__(self, log: list[str] | None = None, name: str = "dev") -> None:
        self.log = log if log is not None else []
        self.name = name
        self.resources: OpenResources | None = None
        self.fail_open = False
        self.modify_status = 0

    async def open(self, resources: OpenResources) -> None:
        if self.fail_open:
            raise RuntimeError("no thanks")
        self.resources = resources
        self.log.append(f"open {self.name}")

    async def close(self) -> None:
        self.log.append(f"close {self.name}")
        self.resources = None

    async def modify(self, request: ModifyRequest) -> int:
        self.log.append(f"modify {self.name} {request.target_vp}")
        return self.modify_status


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory.memfd(MEMORY_PAGES * PAGE_SIZE)
    yield mem
    mem.close()


def params(sub: int = 0, **kw: Any) -> OfferParams:
    return OfferParams("test", INST, IFACE, subchannel_index=sub,
                       channel_type=DeviceChannel(pipe_packets=True), **kw)


def gpadl(gpadl_id: int, first_pfn: int, pages: int) -> GpadlChannelRequest:
    return GpadlChannelRequest(
        GpadlRequest(gpadl_id, 1, [pages * PAGE_SIZE, *range(first_pfn, first_pfn + pages)])
    )


def open_request(gpadl_id: int, ring_offset: int) -> OpenChannelRequest:
    return OpenChannelRequest(OpenRequest(OpenData(ring_offset=ring_offset,
                                                   ring_gpadl_id=gpadl_id)))


async def open_channel(server: VmbusServer, channel_id: int, *, gpadl_id: int = 1,
                       first_pfn: int = 10, pages: int = 5, ring_offset: int = 2) -> Any:
    await server.request(channel_id, gpadl(gpadl_id, first_pfn, pages))
    return await server.request(channel_id, open_request(gpadl_id, ring_offset))


async def test_offer_is_announced_with_flags_and_ids(memory: GuestMemory) -> None:
    server = VmbusServer(memory)
    stream = server.subscribe()
    handle = server.add_child(params(), FakeDevice())
    late = server.subscribe()
    first = stream.receive_nowait()
    assert first == late.receive_nowait()
    assert first.channel_id == handle.channel_id == 1
    assert first.interface_name == "test"
    assert first.offer.key == handle.key
    assert OfferFlags.NAMED_PIPE_MODE in first.offer.flags
    assert first.offer.connection_id == 1 | 2 << 12
    with pytest.raises(OfferError, match="already exists"):
        server.add_child(params(), FakeDevice())
    with pytest.raises(OfferError, match="no primary"):
        server.add_child(OfferParams("x", Guid.new_random(), IFACE, subchannel_index=1),
                         FakeDevice())
    assert server.add_child(params(sub=1), FakeDevice()).channel_id == 2


async def test_hidden_instances_are_announced_only_to_streams_that_see_them(
    memory: GuestMemory,
) -> None:
    server = VmbusServer(memory)
    everyone = server.subscribe()
    relay = server.subscribe(see_hidden=True)
    server.hide_instance(INST)
    hidden = server.add_child(params(), FakeDevice())
    other = OfferParams("other", Guid.new_random(), IFACE)
    shown = server.add_child(other, FakeDevice())
    assert everyone.receive_nowait().channel_id == shown.channel_id
    with pytest.raises(anyio.WouldBlock):
        everyone.receive_nowait()
    assert [relay.receive_nowait().channel_id for _ in range(2)] == [
        hidden.channel_id, shown.channel_id]
    # A late subscriber gets the current offers under the same rule.
    assert server.subscribe().receive_nowait().channel_id == shown.channel_id
    late_relay = server.subscribe(see_hidden=True)
    assert late_relay.receive_nowait().channel_id == hidden.channel_id
    # Unhidden: the next offer of the instance reaches everyone again.
    server.unhide_instance(INST)
    await hidden.revoke()
    again = server.add_child(params(), FakeDevice())
    assert everyone.receive_nowait().channel_id == again.channel_id


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        (GpadlRequest(1, 0, [4096, 10]), "range count"),
        (GpadlRequest(1, 1, [0, 10]), "EmptyByteCount"),
        (GpadlRequest(1, 1, [4096 | 0x1000 << 32, 10, 11]), "OffsetTooLarge"),
        (GpadlRequest(1, 1, [3 * 4096, 10, 11]), "RangeTooSmall"),
        (GpadlRequest(1, 2, [4096, 10]), "EmptyRange"),
        (GpadlRequest(1, 1, [4096, MEMORY_PAGES]), "outside the guest"),
        (GpadlRequest(1, 1, [8192, 10, 2**64 - 1]), "outside the guest"),
        (GpadlRequest(1, 1, [4096, 2**64]), "u64"),
        (GpadlRequest(2**32, 1, [4096, 10]), "not a u32"),
        (GpadlRequest(1, 1, [4096, *range(9000)]), "at most"),
    ],
)
async def test_gpadl_validation(memory: GuestMemory, request_: GpadlRequest, match: str) -> None:
    server = VmbusServer(memory)
    handle = server.add_child(params(), FakeDevice())
    with pytest.raises(ChannelRequestError, match=match) as info:
        await server.request(handle.channel_id, GpadlChannelRequest(request_))
    assert info.value.status == STATUS_UNSUCCESSFUL
    assert server.inspect()["gpadls"] == {}


async def test_gpadl_ids_are_unique_and_owned_by_their_channel(memory: GuestMemory) -> None:
    server = VmbusServer(memory)
    a = server.add_child(params(), FakeDevice())
    b = server.add_child(OfferParams("b", Guid.new_random(), IFACE), FakeDevice())
    await server.request(a.channel_id, gpadl(7, 10, 2))
    with pytest.raises(ChannelRequestError, match="already in use"):
        await server.request(b.channel_id, gpadl(7, 20, 2))
    with pytest.raises(ChannelRequestError, match="does not exist on channel"):
        await server.request(b.channel_id, TeardownGpadlRequest(7))
    with pytest.raises(ChannelRequestError, match="does not exist on channel"):
        await server.request(b.channel_id, open_request(7, 1))
    with pytest.raises(ChannelRequestError, match="not offered"):
        await server.request(99, gpadl(8, 20, 2))
    await server.request(a.channel_id, TeardownGpadlRequest(7))
    await server.request(b.channel_id, gpadl(7, 20, 2))  # the id is free again


async def test_open_splits_the_gpadl_exactly_at_ring_offset(memory: GuestMemory) -> None:
    server = VmbusServer(memory)
    device = FakeDevice()
    handle = server.add_child(params(), device)
    pfns = [40, 41, 42, 50, 51, 52, 53]  # scattered pages; host reads [0, 3), writes [3, 7)
    await server.request(handle.channel_id, GpadlChannelRequest(
        GpadlRequest(3, 1, [len(pfns) * PAGE_SIZE, *pfns])))
    guest_signal = await server.request(handle.channel_id, open_request(3, 3))
    assert guest_signal is not None and handle.is_open
    assert device.resources is not None and device.resources.memory is memory
    host = device.resources.channel
    assert host.incoming.data_len == 2 * PAGE_SIZE
    assert host.outgoing.data_len == 3 * PAGE_SIZE
    # The guest's view: it writes the ring at pages [0, 3) and reads the ring at [3, 7).
    guest = raw_channel_from_rings(RingMemory.from_pages(memory, pfns[3:]),
                                   RingMemory.from_pages(memory, pfns[:3]), connected_signals()[0])
    guest.outgoing.write_inband(b"guest->host")
    assert int.from_bytes(memory.read(pfns[0] * PAGE_SIZE, 4), "little") == 40  # `in` index
    assert bytes(memory.read(pfns[1] * PAGE_SIZE + 16, 11)) == b"guest->host"
    packet = host.incoming.read()
    assert bytes(packet.payload[:11]) == b"guest->host"
    host.incoming.commit()
    host.outgoing.write_inband(b"host->guest!")
    assert bytes(memory.read(pfns[4] * PAGE_SIZE + 16, 12)) == b"host->guest!"
    assert bytes(guest.incoming.read().payload[:12]) == b"host->guest!"
    with pytest.raises(RingEmpty):
        host.incoming.read()
    # A second open of an open channel is refused.
    with pytest.raises(ChannelRequestError, match="while open"):
        await server.request(handle.channel_id, open_request(3, 3))


@pytest.mark.parametrize(
    ("buf", "ring_offset", "match"),
    [
        ([5 * PAGE_SIZE, 10, 11, 12, 13, 14], 0, "ring offset 0"),
        ([5 * PAGE_SIZE, 10, 11, 12, 13, 14], 5, "ring offset 5"),
        ([5 * PAGE_SIZE - 8, 10, 11, 12, 13, 14], 2, "whole pages"),
        ([4 * PAGE_SIZE | 8 << 32, 10, 11, 12, 13, 14], 2, "whole pages"),
        ([4 * PAGE_SIZE, 10, 11, 12, 13], 1, "InvalidRingMemory"),
    ],
)
async def test_open_rejects_bad_ring_gpadls(memory: GuestMemory, buf: list[int],
                                            ring_offset: int, match: str) -> None:
    server = VmbusServer(memory)
    device = FakeDevice()
    handle = server.add_child(params(), device)
    await server.request(handle.channel_id, GpadlChannelRequest(GpadlRequest(1, 1, buf)))
    with pytest.raises(ChannelRequestError, match=match):
        await server.request(handle.channel_id, open_request(1, ring_offset))
    assert device.log == [] and not handle.is_open


async def test_open_rejects_a_multi_range_gpadl(memory: GuestMemory) -> None:
    server = VmbusServer(memory)
    handle = server.add_child(params(), FakeDevice())
    two = GpadlRequest(1, 2, [2 * PAGE_SIZE, 10, 11, 2 * PAGE_SIZE, 20, 21])
    await server.request(handle.channel_id, GpadlChannelRequest(two))
    with pytest.raises(ChannelRequestError, match="one range"):
        await server.request(handle.channel_id, open_request(1, 2))


async def test_failed_device_open_reports_unsuccessful_and_leaves_nothing_mapped(
    memory: GuestMemory,
) -> None:
    server = VmbusServer(memory)
    device = FakeDevice()
    device.fail_open = True
    handle = server.add_child(params(), device)
    with pytest.raises(ChannelRequestError, match="no thanks") as info:
        await open_channel(server, handle.channel_id)
    assert info.value.status == 0x8000FFFF
    assert not handle.is_open and handle.open_resources is None
    assert server.inspect()["gpadls"] == {"0x1": {"channel_id": 1, "mapped": 0}}
    device.fail_open = False
    await server.request(handle.channel_id, open_request(1, 2))  # a retry works
    assert handle.is_open


async def test_teardown_of_a_mapped_gpadl_waits_for_close(memory: GuestMemory) -> None:
    server = VmbusServer(memory)
    device = FakeDevice()
    handle = server.add_child(params(), device)
    await open_channel(server, handle.channel_id)
    done = anyio.Event()

    async def teardown() -> None:
        await server.request(handle.channel_id, TeardownGpadlRequest(1))
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(teardown)
        for _ in range(10):
            await anyio.lowlevel.checkpoint()
        assert not done.is_set() and "0x1" in server.inspect()["gpadls"]
        with pytest.raises(ChannelRequestError, match="already being torn down"):
            await server.request(handle.channel_id, TeardownGpadlRequest(1))
        await server.request(handle.channel_id, CloseRequest())
        with anyio.fail_after(5):
            await done.wait()
    assert device.log == ["open dev", "close dev"]
    assert server.inspect()["gpadls"] == {}


async def test_close_and_modify(memory: GuestMemory) -> None:
    server = VmbusServer(memory)
    device = FakeDevice()
    handle = server.add_child(params(), device)
    with pytest.raises(ChannelRequestError, match="cannot close while closed"):
        await server.request(handle.channel_id, CloseRequest())
    with pytest.raises(ChannelRequestError, match="not open"):
        await server.request(handle.channel_id, ModifyChannelRequest(ModifyRequest(1)))
    guest_signal = await open_channel(server, handle.channel_id)
    await server.request(handle.channel_id, ModifyChannelRequest(ModifyRequest(3)))
    device.modify_status = 0xC0000001
    with pytest.raises(ChannelRequestError) as info:
        await server.request(handle.channel_id, ModifyChannelRequest(ModifyRequest(4)))
    assert info.value.status == 0xC0000001
    host_channel = handle.channel
    assert host_channel is not None
    await server.request(handle.channel_id, CloseRequest())
    assert device.log == ["open dev", "modify dev 3", "modify dev 4", "close dev"]
    assert host_channel.closed and guest_signal.closed
    await server.request(handle.channel_id, TeardownGpadlRequest(1))  # unmapped: immediate


async def test_closing_channel_0_closes_subchannels_first(memory: GuestMemory) -> None:
    server = VmbusServer(memory)
    log: list[str] = []
    handles = [server.add_child(params(sub=i), FakeDevice(log, f"sub{i}")) for i in range(3)]
    for i, h in enumerate(handles):
        await open_channel(server, h.channel_id, gpadl_id=i + 1, first_pfn=10 + 8 * i)
    await server.request(handles[0].channel_id, CloseRequest())
    assert log[3:] == ["close sub2", "close sub1", "close sub0"]
    assert not any(h.is_open for h in handles)


async def test_revoke_goes_subchannels_first(memory: GuestMemory) -> None:
    server = VmbusServer(memory)
    log: list[str] = []
    handles = [server.add_child(params(sub=i), FakeDevice(log, f"sub{i}")) for i in range(3)]
    offer = server.subscribe().receive_nowait()
    await open_channel(server, handles[0].channel_id)
    await open_channel(server, handles[2].channel_id, gpadl_id=2, first_pfn=30)
    await server.request(handles[1].channel_id, gpadl(3, 50, 2))
    await handles[0].request(RevokeRequest())
    assert log == ["open sub0", "open sub2", "close sub2", "close sub0"]
    assert all(h.revoked and h.revoked_event.is_set() for h in handles)
    assert offer.revoked is not None and offer.revoked.is_set()
    assert server.inspect() == {"channels": [], "gpadls": {}}
    with pytest.raises(ChannelRequestError, match="not offered"):
        await server.request(handles[0].channel_id, CloseRequest())
    # Channel ids are never reused.
    assert server.add_child(params(), FakeDevice()).channel_id == 4


async def test_save_restore_round_trip(memory: GuestMemory) -> None:
    first = VmbusServer(memory)
    first.add_child(params(), FakeDevice())
    other = OfferParams("other", Guid.new_random(), IFACE)
    first.add_child(other, FakeDevice())
    await first.request(2, gpadl(9, 60, 2))
    await open_channel(first, 1, pages=4, ring_offset=2)
    # The guest writes a packet the device has not read yet: it must survive the restore.
    guest_out = raw_channel_from_rings(RingMemory.from_pages(memory, [12, 13]),
                                       RingMemory.from_pages(memory, [10, 11]),
                                       connected_signals()[0])
    guest_out.outgoing.write_inband(b"in flight")
    state = first.save()
    assert [c.channel_id for c in state.channels] == [1, 2]
    assert state.channels[0].open is not None and state.channels[1].open is None

    second = VmbusServer(memory)
    second.restore(state)
    device = FakeDevice()
    restored = second.add_child(params(), device)
    plain = second.add_child(other, FakeDevice())
    assert (restored.channel_id, plain.channel_id) == (1, 2)
    result = await restored.request(RestoreRequest(was_open=True))
    assert result is not None and result.open_request is not None
    assert result.open_request.open_data.ring_offset == 2
    assert [g.request.id for g in result.gpadls] == [1] and result.gpadls[0].accepted
    resources = restored.open_resources
    assert resources is not None and restored.is_open
    assert bytes(resources.channel.incoming.read().payload[:9]) == b"in flight"
    assert second.guest_signal(1) is restored.guest_signal
    closed = await plain.restore(was_open=False)
    assert closed.open_request is None and [g.request.id for g in closed.gpadls] == [9]
    # A new offer gets an id the restored ones do not use.
    fresh = second.add_child(OfferParams("n", Guid.new_random(), IFACE), FakeDevice())
    assert fresh.channel_id == 3
    # The GPADL is mapped again: a teardown waits for the close.
    await second.request(1, CloseRequest())
    await second.request(1, TeardownGpadlRequest(1))


async def test_device_without_saved_state_is_revoked_and_offered_anew(
    memory: GuestMemory,
) -> None:
    first = VmbusServer(memory)
    first.add_child(params(), FakeDevice())
    await open_channel(first, 1)
    state = first.save()
    second = VmbusServer(memory)
    second.restore(state)
    stream = second.subscribe()
    handle = second.add_child(params(), FakeDevice())
    old = stream.receive_nowait()
    assert old.channel_id == 1
    result = await handle.restore(was_open=False)
    assert result.open_request is None and result.gpadls == ()
    assert old.revoked is not None and old.revoked.is_set()
    new = stream.receive_nowait()
    assert new.channel_id == handle.channel_id == 2 and new.offer.key == old.offer.key
    assert not handle.is_open and second.inspect()["gpadls"] == {}


async def test_a_corrupt_saved_open_is_offered_anew(memory: GuestMemory) -> None:
    first = VmbusServer(memory)
    first.add_child(params(), FakeDevice())
    await open_channel(first, 1)
    state = first.save()
    bad = ServerSavedState((state.channels[0].__class__(
        state.channels[0].interface_id, state.channels[0].instance_id, 0, 1, (),
        state.channels[0].open),), 2)
    second = VmbusServer(memory)
    second.restore(bad)
    handle = second.add_child(params(), FakeDevice())
    result = await handle.restore(was_open=True)
    assert result.open_request is None and handle.channel_id == 2 and not handle.is_open
    with pytest.raises(ValueError, match="before offering"):
        second.restore(state)
    with pytest.raises(ValueError, match="repeats"):
        VmbusServer(memory).restore(ServerSavedState(state.channels * 2))


async def test_aclose_revokes_everything(memory: GuestMemory) -> None:
    server = VmbusServer(memory)
    log: list[str] = []
    server.add_child(params(), FakeDevice(log, "a"))
    server.add_child(params(sub=1), FakeDevice(log, "b"))
    stream = server.subscribe()
    await open_channel(server, 1)
    await open_channel(server, 2, gpadl_id=2, first_pfn=30)
    await server.aclose()
    assert log[2:] == ["close b", "close a"]
    assert [stream.receive_nowait().channel_id for _ in range(2)] == [1, 2]
    with pytest.raises(anyio.EndOfStream):
        stream.receive_nowait()


# -- a hostile guest -------------------------------------------------------------------------

_word = st.one_of(st.integers(0, 2**64 - 1), st.integers(-5, 2**65), st.sampled_from([0, 4096]))


@settings(max_examples=250, deadline=None)
@given(
    gpadl_id=st.integers(-1, 2**33),
    count=st.integers(-1, 4),
    buf=st.lists(st.one_of(_word, st.integers(0, MEMORY_PAGES + 2)), max_size=12),
)
def test_arbitrary_gpadl_requests_are_accepted_or_refused(gpadl_id: int, count: int,
                                                          buf: list[int]) -> None:
    async def main() -> None:
        memory = GuestMemory.anonymous(MEMORY_PAGES * PAGE_SIZE)
        try:
            server = VmbusServer(memory)
            handle = server.add_child(params(), FakeDevice())
            try:
                await server.request(handle.channel_id,
                                     GpadlChannelRequest(GpadlRequest(gpadl_id, count, buf)))
            except ChannelRequestError:
                assert server.inspect()["gpadls"] == {}
                return
            # Accepted: every page it names is guest memory.
            words = buf[: len(buf)]
            assert count >= 1 and all(w >= 0 for w in words)
            assert list(server.inspect()["gpadls"]) == [f"{gpadl_id:#x}"]
        finally:
            memory.close()

    anyio.run(main)


_ops = st.lists(
    st.tuples(
        st.sampled_from(["gpadl", "open", "close", "teardown", "modify", "revoke"]),
        st.integers(0, 3),  # channel id (0 and 3 do not exist)
        st.integers(0, 3),  # GPADL id
        st.integers(-1, 8),  # ring offset / first page / target vp
        st.integers(1, 8),  # pages
    ),
    max_size=25,
)


@settings(max_examples=200, deadline=None)
@given(ops=_ops)
def test_arbitrary_request_sequences_never_hurt_the_host(
    ops: list[tuple[str, int, int, int, int]],
) -> None:
    async def main() -> None:
        memory = GuestMemory.anonymous(MEMORY_PAGES * PAGE_SIZE)
        log: list[str] = []
        try:
            server = VmbusServer(memory)
            handles = [server.add_child(params(sub=i), FakeDevice(log, str(i))) for i in range(2)]
            for op, channel_id, gpadl_id, n, pages in ops:
                request: Any
                if op == "gpadl":
                    request = gpadl(gpadl_id, 8 * n + 8, pages)
                elif op == "open":
                    request = open_request(gpadl_id, n)
                elif op == "close":
                    request = CloseRequest()
                elif op == "teardown":
                    request = TeardownGpadlRequest(gpadl_id)
                elif op == "modify":
                    request = ModifyChannelRequest(ModifyRequest(n))
                else:
                    if 1 <= channel_id <= 2:
                        await handles[channel_id - 1].revoke()
                    continue
                with anyio.CancelScope() as scope:
                    if op == "teardown":
                        scope.cancel()  # a teardown that has to wait is abandoned at once
                    with contextlib.suppress(ChannelRequestError):
                        await server.request(channel_id, request)
                # Invariants: a GPADL is mapped exactly by the open channel that uses it.
                state = server.inspect()
                open_ids = {h.gpadl_id for h in handles if h.is_open and not h.revoked}
                for text, info in state["gpadls"].items():
                    assert info["mapped"] == (int(text, 16) in open_ids)
                assert log.count("open 0") + log.count("open 1") >= log.count(
                    "close 0") + log.count("close 1")
            await server.aclose()
            assert server.inspect() == {"channels": [], "gpadls": {}}
        finally:
            memory.close()

    anyio.run(main)


async def test_hidden_instances_reach_only_streams_that_see_hidden(memory: GuestMemory) -> None:
    server = VmbusServer(memory)
    plain, relay = server.subscribe(), server.subscribe(see_hidden=True)
    server.hide_instance(INST)
    hidden = server.add_child(params(), FakeDevice())
    shown = server.add_child(OfferParams("shown", Guid.new_random(), IFACE), FakeDevice())
    assert plain.receive_nowait().channel_id == shown.channel_id
    with pytest.raises(anyio.WouldBlock):
        plain.receive_nowait()
    assert [relay.receive_nowait().channel_id for _ in range(2)] == [hidden.channel_id,
                                                                     shown.channel_id]
    late = server.subscribe()
    assert late.receive_nowait().channel_id == shown.channel_id
    with pytest.raises(anyio.WouldBlock):
        late.receive_nowait()
    server.unhide_instance(INST)
    assert [o.channel_id for o in (server.subscribe().receive_nowait(),)] == [hidden.channel_id]
    relay.close()
    server.add_child(params(sub=1), FakeDevice())  # a closed subscriber is dropped
    assert plain.receive_nowait().offer.subchannel_index == 1

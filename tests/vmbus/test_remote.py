"""The VMBus worker codecs: offers and open channels across a process seam."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost.fds import fd_kind
from devicehost.handoff import Handoff, HandoffFd, send_handoff
from devicehost.memory import PAGE_SIZE, DmaAllocator, GuestMemory, SharedRegion
from devicehost.vmbus.channel import (
    EventfdSignal,
    connected_channel_pair,
    connected_signals,
    raw_channel_from_rings,
)
from devicehost.vmbus.client import VmbusClient
from devicehost.vmbus.guid import Guid
from devicehost.vmbus.protocol import (
    DeviceChannel,
    HvSocketChannel,
    InterfaceChannel,
    ModifyRequest,
    OfferParams,
    OpenData,
    OpenRequest,
    OpenResources,
    PipeChannel,
)
from devicehost.vmbus.remote import (
    MAX_NAME,
    OpenWire,
    RemoteVmbusError,
    SignalBridge,
    bridge_signal,
    decode_offer_untrusted,
    decode_open_untrusted,
    encode_offer,
    encode_open,
    export_open_resources,
    import_open_resources_untrusted,
)
from devicehost.vmbus.ring import RingMemory
from devicehost.vmbus.server import VmbusServer
from devicehost.vmbus.socketclient import SocketVmbusClient
from devicehost.vmbus.socketserver import VmbusSocketServer

IFACE = Guid.parse("11111111-2222-3333-4444-555555555555")
INSTANCE = Guid.parse("66666666-7777-8888-9999-000000000001")

# -- the offer ------------------------------------------------------------------------------------

_guids = st.binary(min_size=16, max_size=16).map(Guid)
_channel_types = st.one_of(
    st.builds(DeviceChannel, pipe_packets=st.booleans()),
    st.builds(InterfaceChannel, user_defined=st.binary(max_size=120)),
    st.builds(PipeChannel, message_mode=st.booleans(), user_defined=st.binary(max_size=112),
              pipe_flags=st.integers(0, 0xFFFFFFFF)),
    st.builds(HvSocketChannel, is_connect=st.booleans(), is_for_container=st.booleans(),
              silo_id=_guids),
)
_offers = st.builds(
    OfferParams,
    interface_name=st.text(min_size=1, max_size=60),
    instance_id=_guids, interface_id=_guids,
    mmio_megabytes=st.integers(0, 0xFFFF), mmio_megabytes_optional=st.integers(0, 0xFFFF),
    channel_type=_channel_types, subchannel_index=st.integers(0, 0xFFFF),
    mnf_interrupt_latency=st.none() | st.floats(0, 3600),
    offer_order=st.none() | st.integers(0, 0xFFFFFFFF),
    allow_confidential_external_memory=st.booleans(),
)


@given(_offers)
@settings(deadline=None)
def test_offer_round_trips(params: OfferParams) -> None:
    assert decode_offer_untrusted(encode_offer(params)) == params


@given(st.binary(max_size=400))
@settings(max_examples=300, deadline=None)
def test_offer_decoder_raises_only_its_error(data: bytes) -> None:
    with suppress(RemoteVmbusError):
        decode_offer_untrusted(data)


@given(_offers, st.data())
@settings(deadline=None)
def test_offer_decoder_survives_every_byte_flipped(params: OfferParams, data: st.DataObject
                                                  ) -> None:
    raw = bytearray(encode_offer(params))
    at = data.draw(st.integers(0, len(raw) - 1))
    raw[at] ^= data.draw(st.integers(1, 255))
    with suppress(RemoteVmbusError):
        decode_offer_untrusted(bytes(raw))


@pytest.mark.parametrize(("patch", "message"), [
    ((0, b"\x02\x00"), "version 2"),
    ((2, b"\x09"), "unknown channel kind 9"),
    ((3, b"\x80"), "unknown flags"),
    ((3, b"\x02"), "is_for_container"),
    ((42, b"\x00\x00"), "0-byte name"),
])
def test_offer_decoder_names_what_is_wrong(patch: tuple[int, bytes], message: str) -> None:
    raw = bytearray(encode_offer(OfferParams("x", INSTANCE, IFACE)))
    at, value = patch
    raw[at:at + len(value)] = value
    with pytest.raises(RemoteVmbusError, match=message) as info:
        decode_offer_untrusted(bytes(raw))
    assert "worker" in str(info.value)


def test_offer_that_cannot_travel_is_refused() -> None:
    with pytest.raises(RemoteVmbusError, match="interface name"):
        encode_offer(OfferParams("n" * (MAX_NAME + 1), INSTANCE, IFACE))
    with pytest.raises(RemoteVmbusError, match="offer_order"):
        encode_offer(OfferParams("x", INSTANCE, IFACE, offer_order=1 << 32))
    with pytest.raises(RemoteVmbusError, match="latency"):
        encode_offer(OfferParams("x", INSTANCE, IFACE, mnf_interrupt_latency=float("nan")))


def test_offer_with_trailing_bytes_is_refused() -> None:
    raw = encode_offer(OfferParams("x", INSTANCE, IFACE))
    with pytest.raises(RemoteVmbusError, match="name"):
        decode_offer_untrusted(raw + b"!")


# -- the open payload -----------------------------------------------------------------------------

_requests = st.builds(
    OpenRequest,
    st.builds(OpenData, ring_offset=st.just(1), ring_gpadl_id=st.integers(0, 0xFFFFFFFF),
              target_vp=st.none() | st.integers(0, 0xFFFFFFFF),
              event_flag=st.integers(0, 0xFFFF), connection_id=st.integers(0, 0xFFFFFFFF),
              user_data=st.binary(max_size=120)),
    use_confidential_ring=st.booleans(), use_confidential_external_memory=st.booleans(),
    is_external_memory_pinned=st.booleans(),
)
_pages = st.integers(1, 1 << 20).map(lambda n: n * PAGE_SIZE)
_wires = st.builds(
    OpenWire,
    regions=st.lists(st.builds(SharedRegion, gpa=_pages, size=_pages, offset=_pages),
                     min_size=1, max_size=5).map(tuple),
    ring_pfns=st.lists(st.integers(0, 1 << 50), min_size=2, max_size=40).map(tuple),
    request=_requests, unsealed_ok=st.booleans(),
)


@given(_wires)
@settings(deadline=None)
def test_open_payload_round_trips(wire: OpenWire) -> None:
    assert decode_open_untrusted(encode_open(wire)) == wire


@given(st.binary(max_size=600))
@settings(max_examples=300, deadline=None)
def test_open_decoder_raises_only_its_error(data: bytes) -> None:
    with suppress(RemoteVmbusError):
        decode_open_untrusted(data)


@given(_wires, st.data())
@settings(deadline=None)
def test_open_decoder_survives_every_byte_flipped(wire: OpenWire, data: st.DataObject) -> None:
    raw = bytearray(encode_open(wire))
    at = data.draw(st.integers(0, len(raw) - 1))
    raw[at] ^= data.draw(st.integers(1, 255))
    with suppress(RemoteVmbusError):
        decode_open_untrusted(bytes(raw))


def _wire(**changes: object) -> OpenWire:
    base = OpenWire((SharedRegion(0, 16 * PAGE_SIZE, 0),), (0, 1, 2, 3),
                    OpenRequest(OpenData(ring_offset=2, ring_gpadl_id=7)))
    return OpenWire(**{**{"regions": base.regions, "ring_pfns": base.ring_pfns,
                          "request": base.request}, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(("wire", "message"), [
    (_wire(ring_pfns=(0,)), "1 ring pages"),
    (_wire(request=OpenRequest(OpenData(ring_offset=4, ring_gpadl_id=7))), "ring offset 4"),
    (_wire(request=OpenRequest(OpenData(ring_offset=0, ring_gpadl_id=7))), "ring offset 0"),
    (_wire(regions=(SharedRegion(100, PAGE_SIZE, 0),)), "whole pages"),
    (_wire(regions=(SharedRegion(0, 0, 0),)), "whole pages"),
    (_wire(regions=()), "0 regions"),
])
def test_open_decoder_names_what_is_wrong(wire: OpenWire, message: str) -> None:
    with pytest.raises(RemoteVmbusError, match=message) as info:
        decode_open_untrusted(encode_open(wire))
    assert "supervisor" in str(info.value)


# -- import: descriptors ---------------------------------------------------------------------------


def _memfd(size: int, *, seal: bool = True) -> int:
    fd = os.memfd_create("test-guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def _assert_closed(fds: list[int]) -> None:
    assert [fd_kind(fd) for fd in fds] == ["closed"] * len(fds)


def test_import_builds_a_channel_over_the_same_pages() -> None:
    memory = GuestMemory.memfd(16 * PAGE_SIZE)
    try:
        fd = memory.regions[0].fd
        assert fd is not None
        payload = encode_open(_wire())
        imported = import_open_resources_untrusted(payload, [os.dup(fd), _eventfd(), _eventfd()])
        try:
            memory.view(PAGE_SIZE * 5, 4)[:] = b"seen"
            assert bytes(imported.resources.memory.view(PAGE_SIZE * 5, 4)) == b"seen"
            assert imported.resources.request.open_data.ring_gpadl_id == 7
        finally:
            imported.close()
    finally:
        memory.close()


@pytest.mark.parametrize("case", ["count", "regular", "unsealed", "small", "wait-kind",
                                  "notify-read-end", "outside"])
def test_import_refuses_wrong_descriptors_and_closes_them(case: str) -> None:
    payload = encode_open(_wire())
    memory_fd = _memfd(16 * PAGE_SIZE, seal=case != "unsealed")
    wait_fd, notify_fd = _eventfd(), _eventfd()
    fds = [memory_fd, wait_fd, notify_fd]
    message = {"count": "4 descriptors", "regular": "regular file", "unsealed": "F_SEAL_SHRINK",
               "small": "beyond the end", "wait-kind": "not an eventfd",
               "notify-read-end": "write end", "outside": "outside"}[case]
    spare: list[int] = []
    if case == "count":
        fds.append(_eventfd())
    elif case == "regular":
        with tempfile.TemporaryFile() as f:
            f.truncate(16 * PAGE_SIZE)
            fds[0] = os.dup(f.fileno())
        spare.append(memory_fd)
    elif case == "small":
        payload = encode_open(_wire(regions=(SharedRegion(0, 32 * PAGE_SIZE, 0),)))
    elif case == "wait-kind":
        r, w = os.pipe()
        fds[1], spare = r, [w, wait_fd]
    elif case == "notify-read-end":
        r, w = os.pipe()
        fds[2], spare = r, [w, notify_fd]
    elif case == "outside":
        payload = encode_open(_wire(ring_pfns=(0, 1, 2, 99)))
    try:
        with pytest.raises(RemoteVmbusError, match=message):
            import_open_resources_untrusted(payload, fds)
        _assert_closed(fds)
    finally:
        for fd in spare:
            os.close(fd)


def test_import_accepts_unsealed_memory_the_operator_accepted() -> None:
    payload = encode_open(_wire(unsealed_ok=True))
    imported = import_open_resources_untrusted(
        payload, [_memfd(16 * PAGE_SIZE, seal=False), _eventfd(), _eventfd()])
    imported.close()


def test_import_accepts_a_pipe_write_end_to_notify() -> None:
    r, w = os.pipe2(os.O_NONBLOCK)
    try:
        imported = import_open_resources_untrusted(encode_open(_wire()),
                                                   [_memfd(16 * PAGE_SIZE), _eventfd(), w])
        imported.resources.channel.signal_remote()
        assert len(os.read(r, 64)) == 8
        imported.close()
    finally:
        os.close(r)


def test_export_refuses_anonymous_memory_and_rings_not_in_guest_pages() -> None:
    host, guest = connected_channel_pair(PAGE_SIZE)
    memory = GuestMemory.anonymous(16 * PAGE_SIZE)
    try:
        request = OpenRequest(OpenData(ring_offset=1, ring_gpadl_id=1))
        with pytest.raises(RemoteVmbusError, match="not guest pages"):
            export_open_resources(OpenResources(host, memory, request))
    finally:
        memory.close()
        host.close()
        guest.close()


# -- across a process: a worker child serving an echo over the imported channel -------------------

# The child: takes the open channel by handoff on fd argv[1], imports it and answers each message
# with its reverse until "quit", then prints how many it answered.
CHILD = textwrap.dedent(
    """
    import socket, sys
    import anyio
    from devicehost.handoff import receive_handoff
    from devicehost.vmbus.pipe import MessagePipe
    from devicehost.vmbus.remote import import_open_resources_untrusted

    async def main():
        sock = socket.socket(fileno=int(sys.argv[1]))
        sock.setblocking(False)
        handoff = await receive_handoff(sock)
        imported = import_open_resources_untrusted(handoff.envelope,
                                                   [f.fd for f in handoff.fds])
        pipe = MessagePipe(imported.resources.channel)
        count = 0
        while (message := await pipe.recv()) != b"quit":
            await pipe.send(message[::-1])
            count += 1
        imported.close()
        print(count)

    anyio.run(main)
    """
)


class WorkerEchoDevice:
    """A server-side device whose open hands the channel to a child process."""

    def __init__(self, task_group: anyio.abc.TaskGroup) -> None:
        self.tg = task_group
        self.process: subprocess.Popen[bytes] | None = None
        self.bridged = False

    async def open(self, resources: OpenResources) -> None:
        if not isinstance(resources.channel.signal, EventfdSignal):
            resources, bridge = bridge_signal(resources)
            self.bridged = True
            self.tg.start_soon(bridge.run)
        payload, fds = export_open_resources(resources)
        parent, child = socket.socketpair()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", CHILD, str(child.fileno())], pass_fds=[child.fileno()],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            child.close()
            parent.setblocking(False)
            await send_handoff(parent, Handoff(payload, tuple(
                HandoffFd("echo", i, kind, fd) for i, (fd, kind) in enumerate(fds))))
        finally:
            parent.close()
            child.close()

    async def close(self) -> None:
        pass

    async def modify(self, request: ModifyRequest) -> int:
        return 0

    def reap(self) -> tuple[int, str, str]:
        assert self.process is not None
        out, err = self.process.communicate(timeout=30)
        return self.process.returncode, out.decode(), err.decode()


@pytest.fixture
def reaper() -> Iterator[list[subprocess.Popen[bytes]]]:
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()


async def _echo(pipe: object, count: int) -> None:
    from devicehost.vmbus.pipe import MessagePipe

    assert isinstance(pipe, MessagePipe)
    for n in range(count):
        message = os.urandom(1 + n * 97 % 3000)
        await pipe.send(message)
        assert await pipe.recv() == message[::-1]
    await pipe.send(b"quit")


@asynccontextmanager
async def _served(tg: anyio.abc.TaskGroup) -> AsyncIterator[tuple[VmbusServer, WorkerEchoDevice]]:
    memory = GuestMemory.memfd(64 * PAGE_SIZE)
    server = VmbusServer(memory)
    device = WorkerEchoDevice(tg)
    server.add_child(OfferParams("echo", INSTANCE, IFACE,
                                 channel_type=DeviceChannel(pipe_packets=True)), device)
    try:
        yield server, device
    finally:
        await server.aclose()
        memory.close()


@pytest.mark.anyio
async def test_in_process_guest_talks_to_a_child_through_the_bridge(
        reaper: list[subprocess.Popen[bytes]]) -> None:
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg, _served(tg) as (server, device):
            client = VmbusClient(server, DmaAllocator(server.memory))
            offer = await client.wait_offer(lambda o: True)
            async with client.opened(offer) as channel:
                assert device.process is not None
                reaper.append(device.process)
                await _echo(channel.message_pipe(), 200)
                code, out, err = await anyio.to_thread.run_sync(device.reap)
                assert (code, out.strip()) == (0, "200"), err
            assert device.bridged
            assert server.inspect()["gpadls"] == {}
            await client.aclose()
            tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_socket_guest_talks_to_a_child_directly(
        tmp_path: Path, reaper: list[subprocess.Popen[bytes]]) -> None:
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg, _served(tg) as (server, device):
            socket_server = VmbusSocketServer(server, tmp_path / "vmbus.sock")
            await tg.start(socket_server.serve)
            async with SocketVmbusClient.connect(tmp_path / "vmbus.sock",
                                                 memory_size=64 * PAGE_SIZE) as client:
                offer = await client.wait_offer(lambda o: True)
                async with client.opened(offer) as channel:
                    assert device.process is not None
                    reaper.append(device.process)
                    await _echo(channel.message_pipe(), 200)
                    code, out, err = await anyio.to_thread.run_sync(device.reap)
                    assert (code, out.strip()) == (0, "200"), err
                # The guest's interrupts went to the child itself: no bridge ran.
                assert not device.bridged
            await socket_server.aclose()
            tg.cancel_scope.cancel()


def test_export_of_a_socket_guest_channel_passes_the_guest_signal_fds() -> None:
    memory = GuestMemory.memfd(16 * PAGE_SIZE)
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    wait = _eventfd()
    signal = EventfdSignal(wait, w, owns_fds=True)
    channel = raw_channel_from_rings(RingMemory.from_pages(memory, [0, 1]),
                                     RingMemory.from_pages(memory, [2, 3]), signal)
    try:
        payload, fds = export_open_resources(OpenResources(
            channel, memory, OpenRequest(OpenData(ring_offset=2, ring_gpadl_id=1))))
        assert fds == [(memory.regions[0].fd, "memfd"), (wait, "eventfd"), (w, "fifo")]
        assert decode_open_untrusted(payload).ring_pfns == (0, 1, 2, 3)
    finally:
        channel.close()
        os.close(r)
        memory.close()


def test_export_refuses_an_in_process_signal_until_bridged() -> None:
    memory = GuestMemory.memfd(16 * PAGE_SIZE)
    host_signal, guest_signal = connected_signals()
    channel = raw_channel_from_rings(RingMemory.from_pages(memory, [0, 1]),
                                     RingMemory.from_pages(memory, [2, 3]), host_signal)
    resources = OpenResources(channel, memory,
                              OpenRequest(OpenData(ring_offset=2, ring_gpadl_id=1)))
    try:
        with pytest.raises(RemoteVmbusError, match="InProcessSignal"):
            export_open_resources(resources)
        bridged, bridge = bridge_signal(resources)
        _, fds = export_open_resources(bridged)
        assert [kind for _, kind in fds] == ["memfd", "eventfd", "eventfd"]
        bridge.close()
        assert [fd_kind(fd) for fd, _ in fds[1:]] == ["closed", "closed"]
    finally:
        channel.close()
        guest_signal.close()
        memory.close()


@pytest.mark.anyio
async def test_bridge_forwards_both_ways_and_ends_with_the_channel() -> None:
    host_signal, guest_signal = connected_signals()
    worker_wait, worker_notify = EventfdSignal.new_fds()
    worker = EventfdSignal(worker_wait, worker_notify)
    bridge = SignalBridge(host_signal, EventfdSignal(worker_notify, worker_wait, owns_fds=True))
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(bridge.run)
            guest_signal.notify_remote()
            await worker.wait()  # the guest's interrupt reached the worker's eventfd
            worker.notify_remote()
            await guest_signal.wait()  # the worker's interrupt reached the guest
            host_signal.close()  # the host closes the channel: the bridge ends
    assert bridge.worker_side.closed  # its eventfds closed with it (owns_fds)


@pytest.mark.anyio
async def test_a_replaced_bridge_stops_though_its_channel_stays_open() -> None:
    """A device that gets another channel over the same in-process signal (a restore) gets a
    new bridge; closing the old one ends its run at once."""
    host_signal, guest_signal = connected_signals()
    worker_wait, worker_notify = EventfdSignal.new_fds()
    bridge = SignalBridge(host_signal, EventfdSignal(worker_notify, worker_wait, owns_fds=True))
    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(bridge.run)
                # Until its run has begun (wait_all_tasks_blocked is no use here: on asyncio it
                # can wait forever while another test's thread keeps the loop's tasks busy).
                while bridge._scope is None:
                    await anyio.sleep(0)
                bridge.close()
        # The run ended (the task group exited) with the channel still open; the bridge's own
        # eventfd end is closed (checked on the object: in a full test run another thread may
        # reuse the descriptor number at once).
        assert not host_signal.closed
        assert bridge.worker_side.closed
    finally:
        host_signal.close()
        guest_signal.close()


# -- through the worker's codec registry ---------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                   max_size=4),
    max_leaves=12,
)


@given(st.sampled_from(["devicehost.vmbus.OfferParams", "devicehost.vmbus.OpenResources"]),
       _json)
@settings(max_examples=300, deadline=None)
def test_codec_forms_raise_only_codec_errors(tag: str, payload: object) -> None:
    from devicehost.worker.codec import CodecError, decode_value

    with suppress(CodecError):
        decode_value({"@": tag, "v": payload})


@given(_offers)
@settings(deadline=None)
def test_offer_crosses_the_codec_registry(params: OfferParams) -> None:
    from devicehost.worker.codec import decode_value, encode_value

    data, fds = encode_value(params)
    assert fds == []
    assert decode_value(data) == params


def test_open_resources_cross_the_codec_registry_and_are_released() -> None:
    from devicehost.worker.codec import decode_value, encode_value, release_value

    memory = GuestMemory.memfd(16 * PAGE_SIZE)
    wait, notify = _eventfd(), _eventfd()
    channel = raw_channel_from_rings(RingMemory.from_pages(memory, [0, 1]),
                                     RingMemory.from_pages(memory, [2, 3]),
                                     EventfdSignal(wait, notify, owns_fds=True))
    resources = OpenResources(channel, memory,
                              OpenRequest(OpenData(ring_offset=2, ring_gpadl_id=5)))
    try:
        data, fds = encode_value(resources)
        assert fds == [memory.regions[0].fd, wait, notify]  # the resources' own, not copies
        received = decode_value(data, [os.dup(fd) for fd in fds])
        assert isinstance(received, OpenResources)
        assert received.request == resources.request
        memory.view(0, 5)[:] = b"rings"
        assert bytes(received.memory.view(0, 5)) == b"rings"
        signal = received.channel.signal
        assert isinstance(signal, EventfdSignal)
        taken = [signal.wait_fd, signal.notify_fd]
        release_value(received)
        _assert_closed(taken)
        assert received.memory.regions == ()
    finally:
        channel.close()
        memory.close()


def test_open_resources_with_a_descriptor_of_the_wrong_kind_close_every_descriptor() -> None:
    from devicehost.worker.codec import CodecError, decode_value, encode_value

    memory = GuestMemory.memfd(16 * PAGE_SIZE)
    wait, notify = _eventfd(), _eventfd()
    channel = raw_channel_from_rings(RingMemory.from_pages(memory, [0, 1]),
                                     RingMemory.from_pages(memory, [2, 3]),
                                     EventfdSignal(wait, notify, owns_fds=True))
    resources = OpenResources(channel, memory,
                              OpenRequest(OpenData(ring_offset=2, ring_gpadl_id=5)))
    try:
        data, fds = encode_value(resources)
        r, w = os.pipe()
        sent = [os.dup(fds[0]), r, os.dup(fds[2])]  # a pipe where the wait eventfd belongs
        with pytest.raises(CodecError):
            decode_value(data, sent)
        _assert_closed(sent)
        os.close(w)
    finally:
        channel.close()
        memory.close()

"""The vhost-user backend against a frontend written in the test (real socket, memfd, eventfds)."""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost import Device, DeviceState
from devicehost.memory import DmaAllocator, GuestMemory, MemoryRegion
from devicehost.testing import host_with
from devicehost.testing.registry import DeviceSpec
from devicehost.testing.vhost_user import USER_BASE, VhostUserFrontend, sealed_memfd
from devicehost.virtio import VERSION_1, DeviceTraits, VirtioTransport
from devicehost.virtio.vhost_message import (
    F_NEED_REPLY,
    F_VERSION,
    HEADER,
    PROTOCOL_F_CONFIG,
    PROTOCOL_F_REPLY_ACK,
    USER_F_PROTOCOL_FEATURES,
    MemRegion,
    Request,
    VhostUserError,
    VringAddr,
    VringState,
    decode_header_untrusted,
    encode_mem_table,
    encode_u64,
    encode_vring_addr,
    encode_vring_state,
)
from devicehost.virtio.vhost_user import BackendSession

from .echo_device import MAGIC, EchoConfig, EchoDevice

MEMORY_SIZE = 8 * 1024 * 1024


def state_of(device: Device) -> DeviceState:
    """The device's state as of now: a call, so that mypy does not carry an earlier narrowing
    of ``device.state`` past the awaits that change it."""
    return device.state


async def _disconnected(backend: Any, connections: int) -> None:
    """Wait until the backend has finished with its ``connections``-th connection."""
    await backend.wait_finished(connections)
    assert backend.connections == connections


async def _echo(frontend: VhostUserFrontend, payload: bytes) -> bytes:
    requests, replies = frontend.queues
    replies.add(writable=[len(payload)])
    replies.kick()
    requests.add([payload])
    requests.kick()
    assert (await requests.wait_used()).written == 0
    return (await replies.wait_used()).data


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_qemu_sequence_moves_data_then_reconnects(tmp_path: Path) -> None:
    sock = str(tmp_path / "vu.sock")
    specs = [DeviceSpec("echo", "echo", EchoConfig(vhost_user_socket=sock))]
    memory = GuestMemory.memfd(MEMORY_SIZE)
    try:
        async with host_with({"echo": EchoDevice}, specs) as host:
            device = host.devices["echo"]
            backend = host.transport(VirtioTransport).vhost_user_backend("echo")
            with anyio.fail_after(10):
                frontend = await VhostUserFrontend.connect(sock, memory)
                features, config = await frontend.realize()
                assert frontend.queue_count == 2
                assert features >> VERSION_1 & 1 and features >> USER_F_PROTOCOL_FEATURES & 1
                assert struct.unpack("<II", config) == (MAGIC, 0)
                assert device.state is DeviceState.OFFERED
                await frontend.start(1 << VERSION_1 | 1 << USER_F_PROTOCOL_FEATURES)
                assert await _echo(frontend, b"over vhost-user") == b"resu-tsohv revo"
                assert state_of(device) is DeviceState.RUNNING
                big = os.urandom(20000)
                assert await _echo(frontend, big) == big[::-1]
                assert await frontend.stop() == (2, 2)
                assert state_of(device) is DeviceState.CLOSED
                session = backend.session
                assert session is not None and Request.SET_MEM_TABLE in session.received
                await frontend.stream.aclose()

                # The VMM comes back (e.g. after a restart) and resumes the rings.
                frontend.stream = await anyio.connect_unix(sock)
                await frontend.realize()
                await frontend.start(1 << VERSION_1 | 1 << USER_F_PROTOCOL_FEATURES,
                                     bases=(2, 2))
                assert await _echo(frontend, b"again") == b"niaga"
                await frontend.aclose()
                await _disconnected(backend, 2)
            assert state_of(device) is DeviceState.CLOSED
            assert backend.errors == []
    finally:
        memory.close()


@pytest.mark.anyio
async def test_event_idx_and_disconnect_without_stop(tmp_path: Path) -> None:
    sock = str(tmp_path / "vu.sock")
    specs = [DeviceSpec("echo", "echo", EchoConfig(vhost_user_socket=sock))]
    memory = GuestMemory.memfd(MEMORY_SIZE)
    try:
        async with host_with({"echo": EchoDevice}, specs) as host:
            device = host.devices["echo"]
            with anyio.fail_after(10):
                frontend = await VhostUserFrontend.connect(sock, memory)
                features, _ = await frontend.realize()
                await frontend.start(features, event_idx=True)
                for i in range(20):
                    payload = bytes([i]) * (i + 1)
                    assert await _echo(frontend, payload) == payload[::-1]
                await frontend.aclose()  # the VMM dies with the device running
                await _disconnected(host.transport(VirtioTransport).vhost_user_backend("echo"), 1)
                assert device.state is DeviceState.CLOSED
    finally:
        memory.close()


def _bad_messages() -> list[tuple[str, int, bytes, int, str]]:
    # (id, request, payload, number of fds to attach, expected error fragment)
    table = encode_mem_table([MemRegion(0, 4096, USER_BASE, 0)])
    addr = encode_vring_addr(VringAddr(0, 0, USER_BASE, USER_BASE + 8192, USER_BASE + 4096, 0))
    return [
        ("unknown", 99, b"", 0, "unsupported request 99"),
        ("payload-size", Request.SET_FEATURES, b"\0" * 4, 0, "4 bytes, not 8"),
        ("huge", Request.SET_FEATURES, b"\0" * 5000, 0, "5000-byte payload"),
        ("feature", Request.SET_FEATURES, encode_u64(1 << 63), 0, "never offered"),
        ("fds-mismatch", Request.SET_MEM_TABLE, table, 0, "1 regions but 0 file descriptors"),
        ("no-table", Request.SET_VRING_ADDR, addr, 0, "in no region of the memory table"),
        ("vring-index", Request.SET_VRING_NUM, encode_vring_state(VringState(7, 8)), 0,
         "names vring 7"),
        ("vring-num", Request.SET_VRING_NUM, encode_vring_state(VringState(0, 100)), 0,
         "not a power of two"),
        ("stray-fd", Request.SET_OWNER, b"", 1, "1 unexpected fds"),
        ("fd-truncated", Request.SET_OWNER, b"", 9, "8 unexpected fds"),  # the kernel keeps 8
        ("kick-nofd", Request.SET_VRING_KICK, encode_u64(0x100), 0, "polling mode"),
        ("config", Request.GET_CONFIG, struct.pack("<III", 250, 16, 0) + bytes(16), 0,
         "exceeds the 256-byte config space"),
    ]


@pytest.mark.anyio
async def test_hostile_frontend_is_dropped_and_backend_keeps_serving(tmp_path: Path) -> None:
    sock = str(tmp_path / "vu.sock")
    specs = [DeviceSpec("echo", "echo", EchoConfig(vhost_user_socket=sock))]
    memory = GuestMemory.memfd(MEMORY_SIZE)
    try:
        async with host_with({"echo": EchoDevice}, specs) as host:
            backend = host.transport(VirtioTransport).vhost_user_backend("echo")
            cases = _bad_messages()
            with anyio.fail_after(10):
                for n, (_, request, payload, nfds, expected) in enumerate(cases):
                    frontend = await VhostUserFrontend.connect(sock, memory)
                    fds = [os.eventfd(0) for _ in range(nfds)]
                    await frontend.send(request, payload, fds)
                    for fd in fds:
                        os.close(fd)
                    # The backend hangs up on us.
                    with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                        await frontend.stream.receive(1)
                    await frontend.aclose()
                    await _disconnected(backend, n + 1)
                    assert expected in backend.errors[n]
                # A well-behaved VMM is still served.
                frontend = await VhostUserFrontend.connect(sock, memory)
                await frontend.realize()
                await frontend.aclose()
                await _disconnected(backend, len(cases) + 1)
            assert len(backend.errors) == len(cases)
    finally:
        memory.close()


@pytest.mark.anyio
async def test_reply_ack_only_when_negotiated(tmp_path: Path) -> None:
    sock = str(tmp_path / "vu.sock")
    specs = [DeviceSpec("echo", "echo", EchoConfig(vhost_user_socket=sock))]
    memory = GuestMemory.memfd(MEMORY_SIZE)
    try:
        async with host_with({"echo": EchoDevice}, specs) as host:
            backend = host.transport(VirtioTransport).vhost_user_backend("echo")
            with anyio.fail_after(10):
                frontend = await VhostUserFrontend.connect(sock, memory)
                protocol = await frontend.get_u64(Request.GET_PROTOCOL_FEATURES)
                assert protocol >> PROTOCOL_F_CONFIG & 1 and protocol >> PROTOCOL_F_REPLY_ACK & 1
                # Without REPLY_ACK negotiated, need_reply gets no answer: the next reply we read
                # is GET_QUEUE_NUM's.
                await frontend.send(Request.SET_OWNER, flags=F_VERSION | F_NEED_REPLY)
                assert await frontend.get_u64(Request.GET_QUEUE_NUM) == 2
                await frontend.send(Request.SET_PROTOCOL_FEATURES,
                                    encode_u64(1 << PROTOCOL_F_REPLY_ACK))
                await frontend.send(Request.SET_OWNER, flags=F_VERSION | F_NEED_REPLY)
                assert await frontend.reply(Request.SET_OWNER) == encode_u64(0)
                await frontend.aclose()
                await _disconnected(backend, 1)
            assert backend.errors == []
    finally:
        memory.close()


def _session() -> BackendSession:
    traits = DeviceTraits(device_id=19, queue_count=2, max_queue_size=128, config=b"\3" + bytes(7))
    return BackendSession(
        traits,
        lambda off, size: traits.config[off : off + size].ljust(size, b"\0"),
        lambda off, data: None,
    )


_REQUESTS = st.sampled_from([int(r) for r in Request]) | st.integers(0, 2**32 - 1)


@settings(max_examples=250, deadline=None)
@given(
    messages=st.lists(
        st.tuples(_REQUESTS, st.sampled_from([1, 9, 0, 5, 0xFFFFFFFF]),
                  st.binary(max_size=300) | st.sampled_from([b"", bytes(8), bytes(40)])),
        max_size=12,
    )
)
def test_arbitrary_messages_only_raise_vhost_user_error(
    messages: list[tuple[int, int, bytes]]
) -> None:
    session = _session()
    try:
        for request, flags, payload in messages:
            raw = HEADER.pack(request, flags, len(payload))
            try:
                header = decode_header_untrusted(raw)
                reply = session.handle(header, payload, [])
            except VhostUserError:
                break
            if reply is not None:
                code, rflags, size = HEADER.unpack_from(reply)
                assert code == request and rflags == 0x5 and size == len(reply) - 12
    finally:
        session.close()


def test_get_config_serves_the_device_config() -> None:
    session = _session()
    reply = session.handle(decode_header_untrusted(HEADER.pack(Request.GET_CONFIG, 1, 20)),
                           struct.pack("<III", 0, 8, 0) + bytes(8), [])
    assert reply == HEADER.pack(Request.GET_CONFIG, 5, 20) + struct.pack("<III", 0, 8, 0) + \
        b"\3" + bytes(7)


@pytest.mark.anyio
async def test_host_shutdown_with_a_running_vmm(tmp_path: Path) -> None:
    sock = str(tmp_path / "vu.sock")
    specs = [DeviceSpec("echo", "echo", EchoConfig(vhost_user_socket=sock))]
    memory = GuestMemory.memfd(MEMORY_SIZE)
    try:
        with anyio.fail_after(10):
            async with host_with({"echo": EchoDevice}, specs) as host:
                device = host.devices["echo"]
                obj = device.pm.get_plugin("echo")
                assert isinstance(obj, EchoDevice)
                frontend = await VhostUserFrontend.connect(sock, memory)
                features, _ = await frontend.realize()
                await frontend.start(features)
                assert await _echo(frontend, b"ab") == b"ba"
                await frontend.send(Request.SET_CONFIG, struct.pack("<III", 4, 2, 0) + b"\7\7")
                assert await frontend.get_u64(Request.GET_QUEUE_NUM) == 2  # SET_CONFIG applied
                assert obj.config_writes == [(4, b"\7\7")]
            # Leaving the host closed the device under the live connection and removed the socket.
            assert obj.closed == 1
            assert not os.path.exists(sock)
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await frontend.stream.receive(1)
            await frontend.aclose()
    finally:
        memory.close()


@pytest.mark.anyio
async def test_eventfd_doorbell_waits_for_its_fd() -> None:
    from devicehost.virtio import EventfdDoorbell

    bell = EventfdDoorbell()
    bell.ring()  # no fd yet: dropped
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(bell.wait)
            await anyio.wait_all_tasks_blocked()
            bell.set_fd(fd)
            os.eventfd_write(fd, 1)
    assert bell.rings == 1
    bell.close()


@pytest.mark.anyio
async def test_lying_guest_fails_the_device_and_signals_the_err_fd(tmp_path: Path) -> None:
    sock = str(tmp_path / "vu.sock")
    specs = [DeviceSpec("echo", "echo", EchoConfig(vhost_user_socket=sock))]
    memory = GuestMemory.memfd(MEMORY_SIZE)
    try:
        async with host_with({"echo": EchoDevice}, specs) as host:
            device = host.devices["echo"]
            backend = host.transport(VirtioTransport).vhost_user_backend("echo")
            with anyio.fail_after(10):
                frontend = await VhostUserFrontend.connect(sock, memory)
                features, _ = await frontend.realize()
                err = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                frontend.own_fds.append(err)
                await frontend.send(Request.SET_VRING_ERR, encode_u64(0), [err])
                await frontend.start(features)
                requests = frontend.queues[0]
                # The guest publishes a head outside its 128-entry table.
                memory.write(requests.layout.avail_gpa + 4, struct.pack("<H", 500))
                memory.write(requests.layout.avail_gpa + 2, struct.pack("<H", 1))
                requests.kick()
                await anyio.wait_readable(err)
                assert os.eventfd_read(err) == 1
                assert device.state is DeviceState.FAILED
                assert "head 500 on the avail ring" in (device.failure or "")
                tree = host.transport(VirtioTransport).describe("echo")
                assert tree["mode"] == "vhost-user" and tree["socket"] == sock
                assert "head 500" in tree["queues"][0]["broken"]
                # The VMM stops the rings: the failed device is closed, ready for a new start.
                assert await frontend.stop() == (0, 0)
                assert state_of(device) is DeviceState.CLOSED
                await frontend.aclose()
                await _disconnected(backend, 1)
            assert backend.errors == []
    finally:
        memory.close()


@pytest.mark.anyio
async def test_two_regions_of_one_memfd_with_offsets(tmp_path: Path) -> None:
    """Guest RAM split around a hole (as QEMU does above 4 GiB): one memfd, two regions, the
    second at file offset 4 MiB and guest address 4 GiB; rings and buffers live in the second."""
    sock = str(tmp_path / "vu.sock")
    specs = [DeviceSpec("echo", "echo", EchoConfig(vhost_user_socket=sock))]
    fd = sealed_memfd(8 << 20)
    high = 1 << 32
    memory = GuestMemory([MemoryRegion(0, 4 << 20, fd=fd, offset=0),
                          MemoryRegion(high, 4 << 20, fd=fd, offset=4 << 20)])
    try:
        async with host_with({"echo": EchoDevice}, specs) as host:
            backend = host.transport(VirtioTransport).vhost_user_backend("echo")
            with anyio.fail_after(10):
                frontend = await VhostUserFrontend.connect(
                    sock, memory, DmaAllocator(memory, gpa=high, size=4 << 20)
                )
                features, _ = await frontend.realize()
                await frontend.start(features)
                assert frontend.queues[0].layout.desc_gpa >= high
                session = backend.session
                assert session is not None and session.memory is not None
                assert [(r.gpa, r.size) for r in session.memory.regions] == [
                    (0, 4 << 20), (high, 4 << 20)]
                payload = os.urandom(9000)
                assert await _echo(frontend, payload) == payload[::-1]
                await frontend.aclose()
                await _disconnected(backend, 1)
            assert backend.errors == []
    finally:
        memory.close()
        os.close(fd)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("regions", "use_eventfd", "message"),
    [
        ([(0, 2 << 20, 0)], False, "beyond the end of its 1048576-byte file"),
        ([(0, 1 << 20, 0), (0x80000, 4096, 0)], False, "regions overlap"),
        ([(0, 4096, 0)], True, "region 0 (guest address 0x0): the fd is a eventfd, not a memfd"),
        ([(0, 4096, (1 << 20) - 2048)], False, "beyond the end"),
    ],
)
async def test_hostile_memory_tables(
    tmp_path: Path, regions: list[tuple[int, int, int]], use_eventfd: bool, message: str
) -> None:
    sock = str(tmp_path / "vu.sock")
    specs = [DeviceSpec("echo", "echo", EchoConfig(vhost_user_socket=sock))]
    memory = GuestMemory.memfd(MEMORY_SIZE)
    fd = os.eventfd(0) if use_eventfd else sealed_memfd(1 << 20, "small")
    try:
        async with host_with({"echo": EchoDevice}, specs) as host:
            backend = host.transport(VirtioTransport).vhost_user_backend("echo")
            with anyio.fail_after(10):
                frontend = await VhostUserFrontend.connect(sock, memory)
                table = encode_mem_table(
                    [MemRegion(gpa, size, USER_BASE + off, off) for gpa, size, off in regions]
                )
                await frontend.send(Request.SET_MEM_TABLE, table, [fd] * len(regions))
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await frontend.stream.receive(1)
                await frontend.aclose()
                await _disconnected(backend, 1)
            assert len(backend.errors) == 1 and message in backend.errors[0]
    finally:
        os.close(fd)
        memory.close()


@pytest.mark.anyio
async def test_socket_path_in_use_or_unusable(tmp_path: Path) -> None:
    busy = str(tmp_path / "busy.sock")
    stale = str(tmp_path / "stale.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(busy)
    server.listen()
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(stale)  # bound, never listening: a leftover of a crashed run
    dead.close()
    specs = [
        DeviceSpec("busy", "echo", EchoConfig(vhost_user_socket=busy)),
        DeviceSpec("stale", "echo", EchoConfig(vhost_user_socket=stale)),
        DeviceSpec("nodir", "echo", EchoConfig(vhost_user_socket=str(tmp_path / "no/x.sock"))),
    ]
    try:
        async with host_with({"echo": EchoDevice}, specs) as host:
            assert "is in use by another running server" in host.failures["busy"]
            assert "cannot listen on vhost-user socket" in host.failures["nodir"]
            assert "stale" not in host.failures
            with anyio.fail_after(5):
                memory = GuestMemory.memfd(4096)
                frontend = await VhostUserFrontend.connect(stale, memory)
                assert await frontend.get_u64(Request.GET_QUEUE_NUM) == 2
                await frontend.aclose()
                memory.close()
                await _disconnected(host.transport(VirtioTransport).vhost_user_backend("stale"), 1)
    finally:
        server.close()


@pytest.mark.anyio
async def test_file_descriptors_spread_over_one_message_are_bounded(tmp_path: Path) -> None:
    sock = str(tmp_path / "vu.sock")
    specs = [DeviceSpec("echo", "echo", EchoConfig(vhost_user_socket=sock))]
    memory = GuestMemory.memfd(MEMORY_SIZE)
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(8)]
    try:
        async with host_with({"echo": EchoDevice}, specs) as host:
            backend = host.transport(VirtioTransport).vhost_user_backend("echo")
            with anyio.fail_after(10):
                frontend = await VhostUserFrontend.connect(sock, memory)
                table = encode_mem_table([MemRegion(0, 4096, USER_BASE, 0)])
                stream: Any = frontend.stream
                await stream.send_fds(HEADER.pack(Request.SET_MEM_TABLE, 1, len(table)), fds)
                await stream.send_fds(table[:8], fds[:1])
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await frontend.stream.receive(1)
                await frontend.aclose()
                await _disconnected(backend, 1)
            assert backend.errors == ["the VMM sent 9 file descriptors with one message (max 8)"]
    finally:
        for fd in fds:
            os.close(fd)
        memory.close()



@settings(max_examples=20, deadline=None)
@given(cuts=st.lists(st.integers(1, 60), max_size=12))
def test_messages_split_anywhere_are_framed_the_same(tmp_path_factory: Any, cuts: list[int]
                                                     ) -> None:
    """However the front-end's byte stream is cut into writes (inside headers, inside payloads,
    across messages), every message is framed and answered as if sent whole."""
    stream = b"".join([
        HEADER.pack(Request.GET_FEATURES, F_VERSION, 0),
        HEADER.pack(Request.SET_PROTOCOL_FEATURES, F_VERSION, 8) +
        encode_u64(1 << PROTOCOL_F_REPLY_ACK),
        HEADER.pack(Request.SET_OWNER, F_VERSION | F_NEED_REPLY, 0),
        HEADER.pack(Request.GET_QUEUE_NUM, F_VERSION, 0),
    ])
    pieces, rest = [], stream
    for cut in cuts:
        if rest:
            pieces.append(rest[:cut])
            rest = rest[cut:]
    if rest:
        pieces.append(rest)
    sock = str(tmp_path_factory.mktemp("vu") / "vu.sock")

    async def main() -> None:
        specs = [DeviceSpec("echo", "echo", EchoConfig(vhost_user_socket=sock))]
        async with host_with({"echo": EchoDevice}, specs) as host:
            backend = host.transport(VirtioTransport).vhost_user_backend("echo")
            memory = GuestMemory.memfd(4096)
            with anyio.fail_after(10):
                frontend = await VhostUserFrontend.connect(sock, memory)
                for piece in pieces:
                    await frontend.stream.send(piece)
                    await anyio.lowlevel.checkpoint()
                features = struct.unpack("<Q", await frontend.reply(Request.GET_FEATURES))[0]
                assert features >> USER_F_PROTOCOL_FEATURES & 1
                assert await frontend.reply(Request.SET_OWNER) == encode_u64(0)
                assert await frontend.reply(Request.GET_QUEUE_NUM) == encode_u64(2)
                await frontend.aclose()
                await backend.wait_finished(1)
            memory.close()
            assert backend.errors == []

    anyio.run(main)


@pytest.mark.anyio
async def test_a_saved_host_applies_no_frontend_message_until_resumed(tmp_path: Path) -> None:
    """Between Host.save and Host.resume no device hook runs: a front-end's GET_VRING_BASE (which
    closes the device) waits at the host's guest gate, unanswered, and is applied on resume."""
    sock = str(tmp_path / "vu.sock")
    specs = [DeviceSpec("echo", "echo", EchoConfig(vhost_user_socket=sock))]
    memory = GuestMemory.memfd(MEMORY_SIZE)
    try:
        async with host_with({"echo": EchoDevice}, specs) as host:
            device = host.devices["echo"]
            with anyio.fail_after(30):
                frontend = await VhostUserFrontend.connect(sock, memory)
                await frontend.realize()
                await frontend.start(1 << VERSION_1 | 1 << USER_F_PROTOCOL_FEATURES)
                assert await _echo(frontend, b"before") == b"erofeb"
                await host.save()
                assert state_of(device) is DeviceState.OPEN
                bases: list[tuple[int, ...]] = []

                async def power_off() -> None:
                    bases.append(await frontend.stop())

                async with anyio.create_task_group() as tg:
                    tg.start_soon(power_off)
                    await host.gate.until_waiting(1)
                    await anyio.wait_all_tasks_blocked()
                    # Held: the device is neither closed nor answered while the host is saved.
                    assert bases == [] and state_of(device) is DeviceState.OPEN
                    await host.resume()
                assert bases == [(1, 1)]
                assert state_of(device) is DeviceState.CLOSED
                await frontend.aclose()
    finally:
        memory.close()


# -- the safe point of a save for a handoff -----------------------------------------------------


@pytest.mark.anyio
async def test_a_save_for_a_handoff_waits_for_a_whole_message_and_carries_it(
        tmp_path: Path) -> None:
    """Half a message read when the host saves: the save waits for the rest, and the complete
    message travels with the state (unapplied); on a resume (a rollback) this host applies it,
    once."""
    from devicehost.savedstate import decode_envelope_untrusted, decode_state_untrusted
    from devicehost.virtio.vhost_handover import VhostUserHandover
    from devicehost.virtio.vhost_message import ConfigPayload, encode_config, encode_message

    sock = str(tmp_path / "vu.sock")
    specs = [DeviceSpec("echo", "echo", EchoConfig(vhost_user_socket=sock))]
    memory = GuestMemory.memfd(MEMORY_SIZE)
    try:
        async with host_with({"echo": EchoDevice}, specs) as host:
            with anyio.fail_after(30):
                frontend = await VhostUserFrontend.connect(sock, memory)
                features, _ = await frontend.realize()
                await frontend.start(features, event_idx=True)
                assert await _echo(frontend, b"before") == b"erofeb"
                message = encode_message(Request.GET_CONFIG,
                                         encode_config(ConfigPayload(0, 8, 0, bytes(8))))
                await frontend.stream.send(message[:5])
                await anyio.wait_all_tasks_blocked()
                saved: list[Any] = []

                async def save() -> None:
                    saved.append(await host.save_for_handoff())

                async with anyio.create_task_group() as tg:
                    tg.start_soon(save)
                    await anyio.wait_all_tasks_blocked()
                    assert not saved, "the save did not wait for the rest of the message"
                    await frontend.stream.send(message[5:])
                handoff = saved[0]
                try:
                    (entry,) = decode_envelope_untrusted(handoff.envelope)
                    state = decode_state_untrusted(entry, VhostUserHandover)
                    assert state.pending is not None
                    assert state.pending.request == Request.GET_CONFIG
                    assert state.pending.payload == message[HEADER.size:]
                    assert state.device_open and state.device_running
                    assert state.connection is not None and len(state.regions) == 1
                    kinds = sorted(f.kind for f in handoff.fds)
                    assert kinds == ["eventfd"] * 6 + ["memfd"] + ["socket"] * 2
                finally:
                    handoff.close()
                await host.resume()
                config = await frontend.reply(Request.GET_CONFIG)
                assert struct.unpack("<II", config[12:]) == (MAGIC, 1)
                assert await frontend.get_u64(Request.GET_QUEUE_NUM) == 2  # answered once
                assert await _echo(frontend, b"after") == b"retfa"
                await frontend.aclose()
    finally:
        memory.close()

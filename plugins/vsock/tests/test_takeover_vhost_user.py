"""vsock over vhost-user taken over live by real ``devicehost run --takeover`` processes: the
test kit's frontend is the VMM (its one vhost-user connection must never close), the guest stack
on its rings streams both ways on a guest-initiated and a host-initiated connection, and three
handovers fall in the middle of the streams. Every byte arrives once (SHA-256 of each
direction), no connection is reset or reconnected, every old process exits 0, and a connection
opened after the last handover works."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from devicehost.memory import GuestMemory
from devicehost.virtio.vhost_message import Request

from .hostside import read_exactly, read_line
from .servedrun import Flow, Guest, ServedVsock, guest_flow, host_flow

pytestmark = pytest.mark.anyio

HANDOVERS = 3


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def served() -> Iterator[ServedVsock]:
    work = Path(tempfile.mkdtemp(prefix="vsh"))
    run = ServedVsock(work)
    try:
        yield run
    finally:
        run.close()
        shutil.rmtree(work, ignore_errors=True)


async def test_three_takeovers_under_streams_both_ways(served: ServedVsock) -> None:
    await anyio.to_thread.run_sync(served.start)
    memory = GuestMemory.memfd(64 << 20)
    guest = await Guest.connect(served.vhost_user_socket, memory)
    sockets = guest.sockets
    sockets.listen(6000)
    flows = {name: Flow(name) for name in ("a-up", "a-down", "b-up", "b-down")}
    stop = anyio.Event()
    pids = [served.current.pid]
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(sockets.pump)
            with anyio.fail_after(180):
                listener = await anyio.create_unix_listener(f"{served.base_path}_5000")
                a = await sockets.connect(5000, 1024)
                host_a = await listener.accept()
                host_b = await anyio.connect_unix(served.base_path)
                await host_b.send(b"CONNECT 6000\n")
                assert (await read_line(host_b, 30)).startswith(b"OK ")
                b = sockets.accepted[-1]
                async with anyio.create_task_group() as streams:
                    streams.start_soon(guest_flow, sockets, a, flows["a-up"], flows["a-down"],
                                       stop)
                    streams.start_soon(host_flow, host_a, flows["a-down"], flows["a-up"], stop)
                    streams.start_soon(guest_flow, sockets, b, flows["b-up"], flows["b-down"],
                                       stop)
                    streams.start_soon(host_flow, host_b, flows["b-down"], flows["b-up"], stop)
                    for _ in range(HANDOVERS):
                        before = {n: f.received_bytes for n, f in flows.items()}
                        new = await anyio.to_thread.run_sync(served.take_over)
                        pids.append(new.pid)
                        # Data moved during the handover's time: mid-stream.
                        assert all(f.received_bytes > before[n] for n, f in flows.items())
                    stop.set()
                for flow in flows.values():
                    flow.check()
                assert not (a.reset or b.reset)
                # A connection opened after the last handover works.
                c = await sockets.connect(5000, 1030)
                host_c = await listener.accept()
                await c.send_all(b"after the handovers")
                assert await read_exactly(host_c, 19, 30) == b"after the handovers"
                # The VMM's connection is the one it opened: the backend still answers on it.
                features = await guest.frontend.get_u64(Request.GET_FEATURES)
                assert features & 0x7 == 0x7
                for stream in (host_a, host_b, host_c):
                    await stream.aclose()
                await listener.aclose()
            tg.cancel_scope.cancel()
        assert len(set(pids)) == HANDOVERS + 1
        for proc in served.procs:  # no process saw the VMM's connection end (before ours)
            for gone in ("frontend disconnected", "connection on", "broke the protocol"):
                assert gone not in proc.output, proc.output[-3000:]
    finally:
        await guest.aclose()
        memory.close()


async def test_a_device_without_a_driver_binds_its_listeners_when_next_opened(
    served: ServedVsock,
) -> None:
    """Not open, the device saves nothing, so its listeners do not travel: the new process binds
    them when a driver opens the device (not before the takeover commits)."""
    await anyio.to_thread.run_sync(served.start)
    await anyio.to_thread.run_sync(served.take_over)
    with pytest.raises(ConnectionRefusedError):
        await anyio.connect_unix(served.base_path)
    memory = GuestMemory.memfd(64 << 20)
    guest = await Guest.connect(served.vhost_user_socket, memory)
    try:
        # The backend handles messages in order: once this is answered, the vrings it was
        # sent after are started and the device is open.
        await guest.frontend.get_u64(Request.GET_FEATURES)
        async with anyio.create_task_group() as tg:
            tg.start_soon(guest.sockets.pump)
            guest.sockets.listen(6000)
            with anyio.fail_after(60):
                host = await anyio.connect_unix(served.base_path)
                await host.send(b"CONNECT 6000\n")
                assert (await read_line(host, 30)).startswith(b"OK ")
                await host.send(b"ping")
                assert await guest.sockets.accepted[-1].recv_exactly(4) == b"ping"
                await host.aclose()
            tg.cancel_scope.cancel()
    finally:
        await guest.aclose()
        memory.close()


async def test_a_refused_restore_rolls_back_and_the_streams_go_on(served: ServedVsock) -> None:
    """A new process whose config names another guest CID cannot restore the device: it exits
    non-zero naming it, the running process resumes, and the streams carry on intact (then a
    proper takeover still works)."""
    await anyio.to_thread.run_sync(served.start)
    wrong = served.work / "wrong.toml"
    wrong.write_text(served.config.read_text().replace("guest_cid = 3", "guest_cid = 4"))
    memory = GuestMemory.memfd(64 << 20)
    guest = await Guest.connect(served.vhost_user_socket, memory)
    flows = {name: Flow(name) for name in ("up", "down")}
    stop = anyio.Event()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(guest.sockets.pump)
            with anyio.fail_after(120):
                listener = await anyio.create_unix_listener(f"{served.base_path}_5000")
                a = await guest.sockets.connect(5000, 1024)
                host_a = await listener.accept()
                async with anyio.create_task_group() as streams:
                    streams.start_soon(guest_flow, guest.sockets, a, flows["up"], flows["down"],
                                       stop)
                    streams.start_soon(host_flow, host_a, flows["down"], flows["up"], stop)
                    refused = await anyio.to_thread.run_sync(served.refused_takeover, wrong)
                    assert "device 'vsock0'" in refused.output and "guest_cid" in refused.output
                    before = flows["down"].received_bytes
                    await anyio.to_thread.run_sync(served.take_over)
                    assert flows["down"].received_bytes > before
                    stop.set()
                for flow in flows.values():
                    flow.check()
                assert not a.reset
                await host_a.aclose()
                await listener.aclose()
            tg.cancel_scope.cancel()
    finally:
        await guest.aclose()
        memory.close()

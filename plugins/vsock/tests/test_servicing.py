"""Live handoff of the vsock device, in one process (``takeover.py`` stands in for the host):
connections with data in flight both ways survive, byte for byte, with no reset or close seen by
either side; connections in the middle of CONNECT survive; a failed restore rolls back."""

from __future__ import annotations

import logging
import os
import random
import socket
from collections.abc import Callable

import anyio
import pytest

from devicehost import SavedStateError
from devicehost.context import DeviceContext
from devicehost.handoff import FdStash, HandoffError
from devicehost_vsock import VsockConfig, VsockDevice
from devicehost_vsock.guest_stack import GuestConnection, GuestSockets
from devicehost_vsock.protocol import TYPE_SEQPACKET, Op
from devicehost_vsock.saved import SavedPhase

from .hosted import HostedGuest
from .hostside import (
    Stream,
    listen,
    raw,
    read_exactly,
    read_line,
    seq_accept,
    seq_connect,
    seq_listen,
    seq_recv,
    seq_send,
)
from .takeover import (
    Served,
    abandon,
    close,
    hand_over,
    restore,
    resume,
    save_for_handoff,
    served_by_host,
    start,
)

pytestmark = pytest.mark.anyio

SIZE = 3 << 20  # per stream and direction
MESSAGES = 300  # per SEQPACKET direction


class Progress:
    """Bytes delivered so far, all streams together; waiters are woken as it grows."""

    def __init__(self) -> None:
        self.total = 0
        self._waiters: list[tuple[int, anyio.Event]] = []

    def add(self, n: int) -> None:
        self.total += n
        for item in [w for w in self._waiters if w[0] <= self.total]:
            self._waiters.remove(item)
            item[1].set()

    async def reach(self, total: int) -> None:
        if self.total >= total:
            return
        event = anyio.Event()
        self._waiters.append((total, event))
        await event.wait()


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Wait (bounded by the caller's fail_after) until the device's state satisfies
    ``predicate``; it changes only when the event loop runs the device's tasks."""
    while not predicate():
        await anyio.sleep(0.001)


def base_of(guest: HostedGuest) -> str:
    return str(guest.host.devices["vsock"].runner.base_path)


async def host_send(stream: Stream, data: bytes, progress: Progress) -> None:
    for at in range(0, len(data), 32768):
        await stream.send(data[at:at + 32768])


async def host_receive(stream: Stream, size: int, into: bytearray, progress: Progress) -> None:
    while len(into) < size:
        chunk = await stream.receive(min(65536, size - len(into)))
        into += chunk
        progress.add(len(chunk))


async def guest_receive(conn: GuestConnection, size: int, into: bytearray,
                        progress: Progress) -> None:
    while len(into) < size:
        if conn.received:
            n = min(len(conn.received), size - len(into))
            into += conn.received[:n]
            del conn.received[:n]
            progress.add(n)
            continue
        if conn.reset or conn.peer_shutdown:
            raise ConnectionResetError(f"guest connection {conn.local_port} ended")
        await conn.wait_changed()


async def host_connect(base: str, port: int) -> Stream:
    stream = await anyio.connect_unix(base)
    await stream.send(f"CONNECT {port}\n".encode())
    line = await read_line(stream)
    assert line.startswith(b"OK "), line
    return stream


def still_open(sock: socket.socket) -> bool:
    """No end of stream queued (the peer did not close or shut down its write side)."""
    sock.setblocking(False)
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return True


async def test_three_handovers_keep_every_stream_whole_both_ways(guest: HostedGuest) -> None:
    rng = random.Random(15)
    base = base_of(guest)
    sockets = GuestSockets(guest, rx_buffers=32)
    sockets.listen(6000)
    progress = Progress()
    g2h = [rng.randbytes(SIZE) for _ in range(2)]
    h2g = [rng.randbytes(SIZE) for _ in range(2)]
    seq_g2h = [rng.randbytes(rng.choice([0, 1, 100, 4096, 40000, 65536]))
               for _ in range(MESSAGES)]
    seq_h2g = [rng.randbytes(rng.choice([0, 1, 100, 4096, 40000, 65536]))
               for _ in range(MESSAGES)]
    listener = await listen(base, 5000)
    seq_listener = seq_listen(f"{base}_5001")
    served: Served = served_by_host(guest.host)
    got_host = [bytearray(), bytearray()]
    got_guest = [bytearray(), bytearray()]
    got_seq_host: list[bytes | None] = []
    got_seq_guest: list[bytes] = []
    at_handover: list[int] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(sockets.pump)
        with anyio.fail_after(120):
            a = await sockets.connect(5000, 1024)  # guest-initiated
            host_a = await listener.accept()
            host_b = await host_connect(base, 6000)  # host-initiated
            b = sockets.accepted[-1]
            c = await sockets.connect(5001, 1025, TYPE_SEQPACKET)
            host_c = await seq_accept(seq_listener)
            total = 4 * SIZE
            async with anyio.create_task_group() as flows:
                for i, (conn, host) in enumerate(((a, host_a), (b, host_b))):
                    flows.start_soon(conn.send_all, g2h[i])
                    flows.start_soon(host_send, host, h2g[i], progress)
                    flows.start_soon(host_receive, host, SIZE, got_host[i], progress)
                    flows.start_soon(guest_receive, conn, SIZE, got_guest[i], progress)

                async def seq_guest() -> None:
                    for m in seq_g2h:
                        await c.send_messages([m])
                    for _ in seq_h2g:
                        got_seq_guest.append(await c.recv_message())

                async def seq_host() -> None:
                    for m in seq_h2g:
                        await seq_send(host_c, m, 60)
                    for _ in seq_g2h:
                        got_seq_host.append(await seq_recv(host_c, 60))

                flows.start_soon(seq_guest)
                flows.start_soon(seq_host)
                for step in range(1, 4):
                    await progress.reach(total * step // 4)
                    at_handover.append(progress.total)
                    served = await hand_over(guest.host, served, tg)
            # Every connection is still up: one more byte each way on each stream.
            for conn, host in ((a, host_a), (b, host_b)):
                await conn.send_all(b"!")
                assert await read_exactly(host, 1, 30) == b"!"
                await host.send(b"?")
                assert await conn.recv_exactly(1) == b"?"
        assert at_handover[-1] < total, "the last handover came after the streams ended"
        assert [bytes(x) for x in got_host] == g2h
        assert [bytes(x) for x in got_guest] == h2g
        assert got_seq_host == seq_g2h
        assert got_seq_guest == seq_h2g
        assert not (a.reset or b.reset or c.reset or a.peer_shutdown or b.peer_shutdown)
        assert still_open(raw(host_a)) and still_open(raw(host_b))
        # A new connection after the last handover works both ways too.
        with anyio.fail_after(30):
            d = await sockets.connect(5000, 1030)
            host_d = await listener.accept()
            await d.send_all(b"after")
            assert await read_exactly(host_d, 5) == b"after"
        await close(served)
        tg.cancel_scope.cancel()
    for s in (host_a, host_b, host_d):
        await s.aclose()
    host_c.close()
    seq_listener.close()
    await listener.aclose()


async def test_host_connections_mid_connect_survive_a_handover(guest: HostedGuest) -> None:
    """A CONNECT line half read, one read but unanswered by the guest (REQUEST sent), and one
    that connects while the device is stopped: each gets its OK from the new instance."""
    base = base_of(guest)
    served = served_by_host(guest.host)
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(60):
            guest.post_rx(8)
            half = await anyio.connect_unix(base)
            await half.send(b"CONN")
            waiting = await anyio.connect_unix(base)
            await waiting.send(b"CONNECT 6001\n")
            request = await guest.recv_op(Op.REQUEST)
            assert request.header.dst_port == 6001
            manager = served.runner.worker.manager
            await wait_until(lambda: any(bytes(c.connect_line) == b"CONN"
                                         for c in manager._pending))
            handed = await save_for_handoff(served)
            phases = {bytes(c.connect_line): c for c in handed.state.connections}
            assert phases[b"CONN"].phase is SavedPhase.PENDING_CONNECT
            assert phases[b"CONNECT 6001\n"].phase is SavedPhase.HOST_CONNECTING
            deadline = phases[b"CONNECT 6001\n"].deadline_us
            assert deadline is not None and 0 < deadline <= 2_000_000
            late = await anyio.connect_unix(base)  # the old instance is stopped: backlog
            await late.send(b"CONNECT 6002\n")
            late_seq = await seq_connect(f"{base}_seqpacket")  # the SEQPACKET listener's too
            await seq_send(late_seq, b"CONNECT 6004\n")
            new = restore(guest.host, served, handed)
            abandon(served)
            await start(new, tg)
            for queue in new.resources.queues:
                queue.notify()
            guest.send(Op.RESPONSE, 6001, request.header.src_port)
            assert await read_line(waiting) == f"OK {request.header.src_port}\n".encode()
            await half.send(b"ECT 6003\n")
            ports = set()
            for _ in range(3):
                req = await guest.recv_op(Op.REQUEST)
                ports.add((req.header.dst_port, req.header.type))
                guest.send(Op.RESPONSE, req.header.dst_port, req.header.src_port,
                           type_=req.header.type)
            assert ports == {(6002, 1), (6003, 1), (6004, TYPE_SEQPACKET)}
            assert (await read_line(late)).startswith(b"OK ")
            assert (await read_line(half)).startswith(b"OK ")
            assert (await seq_recv(late_seq) or b"").startswith(b"OK ")
            guest.send(Op.RW, 6001, request.header.src_port, b"hello")
            assert await read_exactly(waiting, 5) == b"hello"
        await close(new)
    for s in (half, waiting, late):
        await s.aclose()
    late_seq.close()


async def test_a_failed_restore_rolls_back_and_the_old_instance_serves_on(
    guest: HostedGuest,
) -> None:
    base = base_of(guest)
    sockets = GuestSockets(guest, rx_buffers=16)
    listener = await listen(base, 5000)
    served = served_by_host(guest.host)
    async with anyio.create_task_group() as tg:
        tg.start_soon(sockets.pump)
        with anyio.fail_after(60):
            conns = [await sockets.connect(5000, 1024 + i) for i in range(3)]
            hosts = [await listener.accept() for _ in conns]
            for conn, host in zip(conns, hosts, strict=True):
                await conn.send_all(b"before")
                assert await read_exactly(host, 6) == b"before"
            handed = await save_for_handoff(served)
            # Another guest CID configured: refused before any descriptor is taken.
            with pytest.raises(SavedStateError, match="guest_cid"):
                restore(guest.host, served, handed,
                        config=VsockConfig(guest_cid=9, base_path=base))
            handed = await save_for_handoff(served)
            # The last connection's socket is missing: refused after the first ones were taken
            # (those are closed without a shutdown, which would end them for the old instance).
            last = handed.state.connections[-1].socket
            fd, _ = handed.fds.pop(last)
            os.close(fd)
            with pytest.raises(HandoffError, match=f"handle {last}"):
                restore(guest.host, served, handed)
            await resume(served, tg)
            for conn, host in zip(conns, hosts, strict=True):
                await host.send(b"after")
                assert await conn.recv_exactly(5) == b"after"
                await conn.send_all(b"again")
                assert await read_exactly(host, 5) == b"again"
            assert not any(c.reset or c.peer_shutdown for c in conns)
            assert all(still_open(raw(h)) for h in hosts)
            # The old instance's listener still serves (the refused restore removed nothing).
            host_late = await anyio.connect_unix(base)
            sockets.listen(6000)
            await host_late.send(b"CONNECT 6000\n")
            assert (await read_line(host_late)).startswith(b"OK ")
        tg.cancel_scope.cancel()
    for s in (*hosts, host_late):
        await s.aclose()
    await listener.aclose()


async def test_a_state_file_save_carries_no_connections(guest: HostedGuest) -> None:
    """No live handoff (``--state``): host sockets cannot outlive the process, nothing saved."""
    served = served_by_host(guest.host)
    await served.lifecycle.stop()
    served.ctx.fds.begin_save(carry=False)
    assert served.device.save_open(served.ctx, served.runner) is None
    assert served.ctx.fds.drain() == []
    await served.lifecycle.start()


def test_an_offer_in_a_takeover_binds_no_listener(sock_dir: str) -> None:
    class Host:
        task_group = None  # never used: nothing is bound, nothing served

    path = f"{sock_dir}/vsock"
    device = VsockDevice(VsockConfig(base_path=path))
    stash = FdStash()
    stash.load({})
    ctx = DeviceContext("vsock", "vsock", device.config, logging.getLogger("t"),
                        host=Host(), fds=stash)
    device.offer(ctx)
    assert not os.path.exists(path)



async def test_a_handed_listener_that_is_not_the_listener_is_refused(guest: HostedGuest) -> None:
    """The state names its listeners by handle; whatever descriptor came under that handle must
    be a listening socket bound at base_path, or the restore is refused (and the old instance
    serves on)."""
    base = base_of(guest)
    sockets = GuestSockets(guest, rx_buffers=16)
    listener = await listen(base, 5000)
    served = served_by_host(guest.host)
    async with anyio.create_task_group() as tg:
        tg.start_soon(sockets.pump)
        with anyio.fail_after(60):
            conn = await sockets.connect(5000, 1024)
            host = await listener.accept()
            handed = await save_for_handoff(served)
            lst, sock = handed.state.stream_listener, handed.state.connections[0].socket
            handed.fds[lst], handed.fds[sock] = handed.fds[sock], handed.fds[lst]
            with pytest.raises(SavedStateError, match="is not the listener at"):
                restore(guest.host, served, handed)
            await resume(served, tg)
            await host.send(b"still here")
            assert await conn.recv_exactly(10) == b"still here"
            assert still_open(raw(host))
        tg.cancel_scope.cancel()
    await host.aclose()
    await listener.aclose()

"""Raw channels and their signals."""

from __future__ import annotations

import os

import anyio
import pytest

from devicehost.memory import GuestMemory
from devicehost.vmbus.channel import (
    ChannelClosed,
    EventfdSignal,
    RawChannel,
    connected_channel_pair,
    connected_signals,
    raw_channel_from_rings,
)
from devicehost.vmbus.pipe import MessagePipe
from devicehost.vmbus.ring import RingMemory

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """These tests run on both backends (overrides the directory's asyncio-only fixture)."""
    return str(request.param)


async def test_pair_connects_rings_crosswise() -> None:
    host, guest = connected_channel_pair(5000)
    assert host.outgoing.data_len == guest.incoming.data_len == 8192
    host.outgoing.write_inband(b"to guest")
    guest.outgoing.write_inband(b"to host!")
    assert bytes(guest.incoming.read().payload) == b"to guest"
    assert bytes(host.incoming.read().payload) == b"to host!"
    with pytest.raises(ValueError):
        connected_channel_pair(0)


async def test_signal_wakes_the_peer() -> None:
    host, guest = connected_channel_pair(4096)
    woke: list[str] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            async def wait(name: str) -> None:
                await guest.wait_for_signal()
                woke.append(name)

            tg.start_soon(wait, "a")
            tg.start_soon(wait, "b")
            await anyio.wait_all_tasks_blocked()
            assert woke == []
            host.signal_remote()
    assert sorted(woke) == ["a", "b"]


async def test_signal_before_wait_is_not_lost() -> None:
    host, guest = connected_channel_pair(4096)
    host.signal_remote()
    with anyio.fail_after(5):
        await guest.wait_for_signal()
    # Consumed: the next wait sleeps until the next signal.
    with anyio.move_on_after(0.05) as scope:
        await guest.wait_for_signal()
    assert scope.cancelled_caught


async def test_own_signal_does_not_wake_self() -> None:
    host, _ = connected_channel_pair(4096)
    host.signal_remote()
    with anyio.move_on_after(0.05) as scope:
        await host.wait_for_signal()
    assert scope.cancelled_caught


@pytest.mark.parametrize("closing", ["host", "guest"])
async def test_close_wakes_both_ends_with_channel_closed(closing: str) -> None:
    host, guest = connected_channel_pair(4096)
    errors: list[str] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            async def wait(name: str, channel: RawChannel) -> None:
                with pytest.raises(ChannelClosed):
                    await channel.wait_for_signal()
                errors.append(name)

            tg.start_soon(wait, "host", host)
            tg.start_soon(wait, "guest", guest)
            await anyio.wait_all_tasks_blocked()
            (host if closing == "host" else guest).close()
    assert sorted(errors) == ["guest", "host"]
    assert host.closed and guest.closed
    host.signal_remote()  # a no-op once closed
    with pytest.raises(ChannelClosed):
        await guest.wait_for_signal()


async def test_eventfd_signal_in_one_process() -> None:
    a, b = EventfdSignal.pair()
    try:
        woke = []
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                async def wait(name: str) -> None:
                    await b.wait()
                    woke.append(name)

                # Two waiters on one eventfd: one polls it, the other is woken by the first.
                tg.start_soon(wait, "x")
                tg.start_soon(wait, "y")
                await anyio.wait_all_tasks_blocked()
                a.notify_remote()
        assert sorted(woke) == ["x", "y"]
        b.notify_remote()
        with anyio.fail_after(5):
            await a.wait()
        # The counter was drained by the wait.
        with pytest.raises(BlockingIOError):
            os.eventfd_read(a.wait_fd)
    finally:
        a.close()
        b.close()
    with pytest.raises(ChannelClosed):
        await a.wait()
    with pytest.raises(OSError):
        os.fstat(a.wait_fd)  # the owning end closed its fds


async def test_eventfd_wait_re_polls_as_a_backstop() -> None:
    a, b = EventfdSignal.pair()
    try:
        # No notification at all: the wait still returns (spuriously) after the backstop.
        with anyio.fail_after(5):
            await b.wait()
    finally:
        a.close()
        b.close()


async def test_closing_an_eventfd_end_wakes_its_waiter() -> None:
    a, b = EventfdSignal.pair()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            async def wait() -> None:
                with pytest.raises(ChannelClosed):
                    while True:
                        await a.wait()

            tg.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            a.close()
    b.close()


async def test_channel_over_guest_memory_pages() -> None:
    memory = GuestMemory.anonymous(64 * 4096)
    ring_a = [10, 11, 12, 13, 14]  # guest -> host: control page + 4 data pages
    ring_b = [20, 31, 22, 33, 24]  # host -> guest: scattered data pages
    host_sig, guest_sig = connected_signals()
    host = raw_channel_from_rings(RingMemory.from_pages(memory, ring_a),
                                  RingMemory.from_pages(memory, ring_b), host_sig)
    guest = raw_channel_from_rings(RingMemory.from_pages(memory, ring_b),
                                   RingMemory.from_pages(memory, ring_a), guest_sig)
    h, g = MessagePipe(host), MessagePipe(guest)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            async def echo() -> None:
                while (msg := await g.recv()) != b"bye":
                    await g.send(msg[::-1])

            tg.start_soon(echo)
            for i in range(50):
                msg = bytes(range(256)) * (i + 1)
                await h.send(msg)
                assert await h.recv() == msg[::-1]
                if i == 0:
                    # The host writes ring b: its first message is in page 31 (ring b's first
                    # data page) after descriptor and pipe header; the guest's reply in page 11.
                    assert memory.read(31 * 4096 + 24, 4) == bytes(range(4))
                    assert memory.read(11 * 4096 + 24, 4) == bytes(range(255, 251, -1))
            await h.send(b"bye")


@pytest.mark.anyio
async def test_cancelled_waits_leave_no_waiter_behind_and_a_later_ring_still_wakes() -> None:
    host, guest = connected_channel_pair(4096)
    for _ in range(50):
        with anyio.move_on_after(0):
            await host.wait_for_signal()  # cancelled while waiting
    doorbell = host.signal._local  # type: ignore[attr-defined]
    assert doorbell._waiters.parked == 0  # (other backends share at most one event)
    async with anyio.create_task_group() as tg:
        woken = anyio.Event()

        async def waiter() -> None:
            await host.wait_for_signal()
            woken.set()

        tg.start_soon(waiter)
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        guest.signal_remote()  # one ring wakes every current waiter
        with anyio.fail_after(5):
            await woken.wait()


def test_drain_eventfd_never_blocks_even_if_a_peer_cleared_o_nonblock() -> None:
    # A socket guest shares the eventfd's open file description and can make it blocking; a
    # plain read of a zero counter would then block the host's event loop for good.
    import threading

    from devicehost.vmbus.channel import drain_eventfd

    fd = os.eventfd(0)
    try:
        os.set_blocking(fd, True)
        results: list[bool] = []
        thread = threading.Thread(target=lambda: results.append(drain_eventfd(fd)), daemon=True)
        thread.start()
        thread.join(10)
        assert not thread.is_alive(), "drain_eventfd blocked on a blocking eventfd"
        assert results == [False]
        os.eventfd_write(fd, 3)
        assert drain_eventfd(fd) is True
        assert drain_eventfd(fd) is False
    finally:
        os.close(fd)


async def test_eventfd_signal_on_asyncio_keeps_its_fd_registered_and_loses_no_signal() -> None:
    # The asyncio fast path: the registered callback drains the counter; a signal that arrives
    # while nobody waits is kept for the next wait, and close() unregisters before closing.
    a, b = EventfdSignal.pair()
    with anyio.fail_after(30):
        b.notify_remote()
        await a.wait()  # consumed by the direct drain
        waiter_done = anyio.Event()

        async def waiter() -> None:
            await a.wait()
            waiter_done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            b.notify_remote()
            await waiter_done.wait()
        # Now registered: a signal with no waiter is drained by the callback and kept pending.
        b.notify_remote()
        for _ in range(10):
            await anyio.lowlevel.checkpoint()
        registered = a._loop is not None  # asyncio only; trio waits with wait_readable
        assert a._pending == registered
        await a.wait()
        assert not a._pending
    a.close()
    b.close()
    assert a.closed

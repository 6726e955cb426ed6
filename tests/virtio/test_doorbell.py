"""EventDoorbell: rings coalesce, one ring lets one waiter return, cancelled waits lose no ring.

Run on asyncio (futures per waiter) and trio (the shared anyio event).
"""

from __future__ import annotations

import contextlib
import os
import threading

import anyio
import pytest

from devicehost.virtio import EventDoorbell, EventfdDoorbell


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.anyio
async def test_a_ring_before_the_wait_returns_at_once() -> None:
    bell = EventDoorbell()
    bell.ring()
    with anyio.fail_after(5):
        await bell.wait()
    assert bell.rings == 1


@pytest.mark.anyio
async def test_rings_before_a_wait_coalesce_into_one_return() -> None:
    bell = EventDoorbell()
    bell.ring()
    bell.ring()
    bell.ring()
    with anyio.fail_after(5):
        await bell.wait()
    with anyio.move_on_after(0.05) as scope:
        await bell.wait()
    assert scope.cancelled_caught  # the three rings were one notification
    assert bell.rings == 3


@pytest.mark.anyio
async def test_a_ring_wakes_a_waiter_that_parked_first() -> None:
    bell = EventDoorbell()
    done = anyio.Event()

    async def waiter() -> None:
        await bell.wait()
        done.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            assert not done.is_set()
            bell.ring()
            await done.wait()


@pytest.mark.anyio
async def test_each_ring_lets_exactly_one_of_several_waiters_return() -> None:
    bell = EventDoorbell()
    woken: list[int] = []

    async def waiter(n: int) -> None:
        await bell.wait()
        woken.append(n)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for n in range(3):
                tg.start_soon(waiter, n)
            await anyio.wait_all_tasks_blocked()
            for expected in (1, 2, 3):
                bell.ring()
                await anyio.wait_all_tasks_blocked()
                assert len(woken) == expected
    assert sorted(woken) == [0, 1, 2] and bell.rings == 3


@pytest.mark.anyio
async def test_a_waiter_cancelled_while_parked_leaves_the_next_ring_to_others() -> None:
    bell = EventDoorbell()
    returned: list[str] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            cancelled = anyio.CancelScope()

            async def waiter(name: str, scope: anyio.CancelScope) -> None:
                with scope:
                    await bell.wait()
                    returned.append(name)

            tg.start_soon(waiter, "doomed", cancelled)
            tg.start_soon(waiter, "other", anyio.CancelScope())
            await anyio.wait_all_tasks_blocked()
            cancelled.cancel()
            await anyio.wait_all_tasks_blocked()
            bell.ring()
    assert returned == ["other"]


@pytest.mark.anyio
async def test_a_ring_is_consumed_only_by_a_wait_that_returns() -> None:
    bell = EventDoorbell()
    returned: list[str] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            cancelled = anyio.CancelScope()

            async def doomed() -> None:
                with cancelled:
                    await bell.wait()
                    returned.append("doomed")

            tg.start_soon(doomed)
            await anyio.wait_all_tasks_blocked()
            # Rung, then cancelled before the waiter ran: either its wait still returns (it
            # took the ring) or it is cancelled and the ring stays pending for the next wait.
            bell.ring()
            cancelled.cancel()
        with anyio.move_on_after(0.05):
            await bell.wait()
            returned.append("next")
    assert returned in (["doomed"], ["next"])


@pytest.mark.anyio
async def test_waits_that_time_out_leave_nothing_behind() -> None:
    bell = EventDoorbell()
    for _ in range(50):
        with anyio.move_on_after(0):
            await bell.wait()
    assert bell._waiters.parked == 0  # no parked future per abandoned wait
    bell.ring()
    with anyio.fail_after(5):
        await bell.wait()


def test_a_ring_never_blocks_on_a_peer_made_blocking_and_full_eventfd() -> None:
    """The peer shares the eventfd's open file description: it clears O_NONBLOCK and fills the
    counter, which would make a plain write block the host's event loop forever. The ring skips
    the write instead (the peer has an unread notification), and rings again once it read."""
    peer = os.eventfd(0)
    doorbell = EventfdDoorbell(os.dup(peer))
    try:
        os.set_blocking(peer, True)  # the same open file description as the doorbell's fd
        os.eventfd_write(peer, 0xFFFF_FFFF_FFFF_FFFE)  # the counter's maximum
        finished = threading.Event()

        def ring() -> None:
            doorbell.ring()
            finished.set()

        thread = threading.Thread(target=ring, daemon=True)
        thread.start()
        assert finished.wait(30), "ring() blocked on a full eventfd"
        assert os.eventfd_read(peer) == 0xFFFF_FFFF_FFFF_FFFE
        doorbell.ring()
        assert os.eventfd_read(peer) == 1
    finally:
        doorbell.close()
        os.set_blocking(peer, False)
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(peer)
        os.close(peer)

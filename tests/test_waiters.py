"""Waiters: parked tasks return after the next wake-up, on asyncio and on trio; and the wait
primitives built for notifications (doorbells, VMBus signals) all yield on every wait."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from devicehost.virtio import DoorbellError, EventDoorbell, EventfdDoorbell
from devicehost.vmbus.channel import EventfdSignal, connected_signals
from devicehost.waiters import Waiters

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_a_wake_releases_every_task_parked_then() -> None:
    waiters = Waiters()
    woken: list[int] = []

    async def park(n: int) -> None:
        await waiters.park()
        woken.append(n)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for n in range(3):
                tg.start_soon(park, n)
            await anyio.wait_all_tasks_blocked()
            assert woken == []
            waiters.wake()
    assert sorted(woken) == [0, 1, 2]


async def test_a_wake_with_nobody_parked_is_lost() -> None:
    waiters = Waiters()
    waiters.wake()
    with anyio.move_on_after(0.05) as scope:
        await waiters.park()
    assert scope.cancelled_caught


async def test_a_cancelled_task_leaves_and_the_next_wake_releases_the_others() -> None:
    waiters = Waiters()
    woken: list[str] = []

    async def park(name: str) -> None:
        await waiters.park()
        woken.append(name)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            async with anyio.create_task_group() as doomed:
                doomed.start_soon(park, "cancelled")
                tg.start_soon(park, "kept")
                await anyio.wait_all_tasks_blocked()
                doomed.cancel_scope.cancel()
            waiters.wake()
    assert woken == ["kept"]
    assert waiters.parked == 0


async def test_timed_out_parks_leave_nothing_behind() -> None:
    waiters = Waiters()
    for _ in range(50):
        with anyio.move_on_after(0):
            await waiters.park()
    assert waiters.parked == 0


async def test_each_wake_releases_only_the_tasks_parked_before_it() -> None:
    waiters = Waiters()
    rounds = 0

    async def park_twice() -> None:
        nonlocal rounds
        for _ in range(2):
            await waiters.park()
            rounds += 1

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(park_twice)
            await anyio.wait_all_tasks_blocked()
            waiters.wake()
            await anyio.wait_all_tasks_blocked()
            assert rounds == 1
            waiters.wake()
    assert rounds == 2


# -- fairness: every wait primitive built for notifications yields, even when already signalled

async def _bystander_turns(ring: Callable[[], None], wait: Callable[[], Awaitable[None]]) -> int:
    """Ring then wait 200 times in a row; how many turns another task got meanwhile."""
    turns = 0
    done = False

    async def bystander() -> None:
        nonlocal turns
        while not done:
            turns += 1
            await anyio.lowlevel.checkpoint()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(bystander)
            await anyio.lowlevel.checkpoint()
            start = turns
            for _ in range(200):
                ring()
                await wait()
            done = True
    return turns - start


def _eventfd_doorbell() -> tuple[Callable[[], None], Callable[[], Awaitable[None]], Any]:
    bell = EventfdDoorbell(os.eventfd(0, os.EFD_CLOEXEC))
    return bell.ring, bell.wait, bell.close


def _event_doorbell() -> tuple[Callable[[], None], Callable[[], Awaitable[None]], Any]:
    bell = EventDoorbell()
    return bell.ring, bell.wait, lambda: None


def _in_process_signal() -> tuple[Callable[[], None], Callable[[], Awaitable[None]], Any]:
    a, b = connected_signals()
    return a.notify_remote, b.wait, a.close


def _eventfd_signal() -> tuple[Callable[[], None], Callable[[], Awaitable[None]], Any]:
    a, b = EventfdSignal.pair()

    def close() -> None:
        b.close()
        a.close()

    return a.notify_remote, b.wait, close


@pytest.mark.parametrize(
    "make", [_event_doorbell, _eventfd_doorbell, _in_process_signal, _eventfd_signal],
    ids=["EventDoorbell", "EventfdDoorbell", "InProcessSignal", "EventfdSignal"],
)
async def test_a_wait_that_is_already_signalled_still_yields(
    make: Callable[[], tuple[Callable[[], None], Callable[[], Awaitable[None]], Any]],
) -> None:
    """A peer ringing without pause (a kick storm) must not keep the waiting task running:
    every wait gives the event loop at least one turn."""
    ring, wait, close = make()
    try:
        assert await _bystander_turns(ring, wait) >= 150  # about one turn per wait (not 0)
    finally:
        close()


async def test_an_eventfd_doorbell_on_a_wrong_fd_fails_instead_of_spinning(
    tmp_path: Path,
) -> None:
    """A doorbell handed a non-eventfd (an in-process caller's mistake; transports check peers'
    fds first) raises DoorbellError rather than spinning (/dev/zero) or leaking OSError
    errno 0 (/dev/null, an empty file)."""
    (tmp_path / "empty").write_bytes(b"")
    for path, message in (("/dev/zero", "a read returned 8 bytes of zeros"),
                          ("/dev/null", "a read returned 0 bytes"),
                          (str(tmp_path / "empty"), "a read returned 0 bytes")):
        bell = EventfdDoorbell(os.open(path, os.O_RDONLY))
        try:
            with anyio.fail_after(5), pytest.raises(DoorbellError, match=message):
                await bell.wait()
        finally:
            bell.close()

"""Waiters: parked tasks return after the next wake-up, on asyncio and on trio."""

from __future__ import annotations

import anyio
import pytest

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

"""The guest gate: guest requests wait while the host is quiesced, pass after resume, fail after
shut; a quiesce waits for the requests already inside; nested passages and host bypasses never
wait."""

from __future__ import annotations

import anyio
import pytest

from devicehost.gate import GateShutError, GuestGate

pytestmark = pytest.mark.anyio


async def test_open_gate_lets_requests_through_at_once() -> None:
    gate = GuestGate()
    with anyio.fail_after(30):
        async with gate.passage("open"):
            assert gate.inside == 1
    assert gate.inside == 0 and gate.is_open


async def test_closed_gate_holds_requests_until_resume() -> None:
    gate = GuestGate()
    passed: list[str] = []

    async def guest(name: str) -> None:
        async with gate.passage(name):
            passed.append(name)

    with anyio.fail_after(30):
        await gate.quiesce()
        assert not gate.is_open
        async with anyio.create_task_group() as tg:
            tg.start_soon(guest, "a")
            tg.start_soon(guest, "b")
            await gate.until_waiting(2)
            assert passed == [] and gate.waiting == 2
            gate.resume()
        assert sorted(passed) == ["a", "b"] and gate.waiting == 0


async def test_quiesce_waits_for_the_requests_inside() -> None:
    gate = GuestGate()
    entered, leave = anyio.Event(), anyio.Event()
    order: list[str] = []

    async def guest() -> None:
        async with gate.passage("slow open"):
            entered.set()
            await leave.wait()
            order.append("guest left")

    async def quiesce() -> None:
        await gate.quiesce()
        order.append("quiesced")

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(guest)
            await entered.wait()
            tg.start_soon(quiesce)
            await anyio.wait_all_tasks_blocked()
            assert order == []  # the quiesce is still waiting for the guest
            leave.set()
    assert order == ["guest left", "quiesced"]


async def test_shut_fails_waiting_and_later_requests() -> None:
    gate = GuestGate()
    errors: list[str] = []

    async def guest() -> None:
        try:
            async with gate.passage("open of device 'fs'"):
                errors.append("passed")
        except GateShutError as exc:
            errors.append(str(exc))

    with anyio.fail_after(30):
        await gate.quiesce()
        async with anyio.create_task_group() as tg:
            tg.start_soon(guest)
            await gate.until_waiting(1)
            gate.shut()
        assert errors == ["open of device 'fs': the host is closing"]
        with pytest.raises(GateShutError):
            async with gate.passage("late"):
                pass


async def test_nested_passages_and_bypasses_never_wait() -> None:
    gate = GuestGate()
    with anyio.fail_after(30):
        # A quiesce begun while a guest request is inside closes the gate; the request's own
        # nested calls (closing its subchannels) still go through, so the quiesce can end.
        async with gate.passage("close primary"), anyio.create_task_group() as tg:
            tg.start_soon(gate.quiesce)
            await anyio.wait_all_tasks_blocked()
            assert not gate.is_open
            async with gate.passage("close subchannel"):
                pass
            tg.cancel_scope.cancel()
        with gate.bypass():
            async with gate.passage("revoke by the host"):
                assert gate.waiting == 0

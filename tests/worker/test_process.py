"""The supervisor's side of a worker process: the budget of relayed log lines (a worker that
floods its output is not relayed line by line; the lines dropped are counted and said)."""

from __future__ import annotations

import logging

import anyio
import pytest

from devicehost.config import HostSettings
from devicehost.worker import WorkerSettings
from devicehost.worker.process import LOG_BURST, LogBudget

from .test_proxy import BOUND, Pair, assert_reaped, crash_host, dh_crash, pids_of, wait_until


def test_the_budget_allows_a_burst_then_its_rate() -> None:
    budget = LogBudget(0.0, rate=10.0, burst=5)
    assert [budget.take(0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert budget.take(0.05) is False  # half a token
    assert budget.take(0.1) is True  # a whole one: 10 a second
    assert budget.take(100.0) and budget.dropped == 3 == budget.total_dropped
    assert [budget.take(100.0) for _ in range(5)] == [True] * 4 + [False]  # refilled to burst only


def test_a_drop_note_comes_at_most_once_a_second_or_at_the_end() -> None:
    budget = LogBudget(0.0, rate=1.0, burst=1)
    assert budget.take(0.0) and not budget.take(0.0) and not budget.take(0.1)
    assert budget.note(0.5) == 0  # not due yet
    assert budget.note(1.0) == 2 and budget.dropped == 0
    assert budget.take(1.0) and not budget.take(1.0)  # refilled one token, then empty
    assert budget.note(1.5) == 0
    assert budget.note(1.5, final=True) == 1
    assert budget.note(9.0, final=True) == 0 and budget.total_dropped == 3



@pytest.mark.anyio
async def test_a_worker_flooding_its_log_is_relayed_within_the_budget(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    pair = Pair()
    with anyio.fail_after(BOUND):
        async with crash_host(pair, dh_crash.CrashConfig(how="spam", hook="run"),
                              WorkerSettings(), HostSettings()) as host:
            await wait_until(lambda: "log lines dropped" in caplog.text)
            await pair.round_trip(1)  # the inline device beside it answers
            device = host.devices["crash"]
            assert device.failure is None
            pids = pids_of(host)
    assert_reaped(pids)
    relayed = [r for r in caplog.records if r.getMessage().startswith("spam line")]
    assert LOG_BURST <= len(relayed) < 20_000 // 2, len(relayed)
    dropped = sum(int(r.getMessage().split(": ")[1].split()[0]) for r in caplog.records
                  if "log lines dropped" in r.getMessage())
    assert len(relayed) + dropped == 20_000, "every line is either relayed or counted"

"""The restart policy (sans I/O): doubling delay, burst limit within the interval, no restart."""

from __future__ import annotations

from devicehost.worker.restart import RestartPolicy
from devicehost.worker.settings import WorkerSettings


def test_the_delay_doubles_up_to_its_maximum_and_the_burst_ends_it() -> None:
    policy = RestartPolicy(WorkerSettings(restart="on-failure", restart_burst=5,
                                          restart_interval=60, restart_delay=1,
                                          restart_delay_max=5))
    assert [policy.next_delay(t) for t in range(6)] == [1, 2, 4, 5, 5, None]
    assert policy.restarts == 5
    assert "restarted 5 time(s); the limit is 5 within 60 s" in policy.summary()


def test_restarts_older_than_the_interval_no_longer_count() -> None:
    policy = RestartPolicy(WorkerSettings(restart="on-failure", restart_burst=2,
                                          restart_interval=10, restart_delay=1))
    assert policy.next_delay(0) == 1
    assert policy.next_delay(1) == 2
    assert policy.next_delay(2) is None
    assert policy.next_delay(10.5) == 2  # the first fell out of the window
    assert policy.next_delay(11.5) == 2  # so did the second; the one at 10.5 still counts


def test_no_restart_without_on_failure() -> None:
    assert RestartPolicy(WorkerSettings()).next_delay(0) is None

"""The restart policy of a device's worker, like systemd's ``Restart=on-failure`` with
``StartLimitBurst=``/``StartLimitIntervalSec=`` and a growing delay (sans I/O: time is passed in).

A worker *fails* while its device runs when it exits, is killed by a signal, stops answering, or
its ``run`` raises. With ``restart = "on-failure"`` the supervisor then starts a new worker after a
delay: ``restart_delay`` for the first restart within ``restart_interval`` seconds, doubled for
each further one, at most ``restart_delay_max``. A failure that would be restart number
``restart_burst + 1`` within ``restart_interval`` seconds is final: the device is FAILED.
"""

from __future__ import annotations

from collections import deque

from devicehost.worker.settings import WorkerSettings

__all__ = ["RestartPolicy"]


class RestartPolicy:
    """Decides whether, and after how long, a failed worker is restarted."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self._recent: deque[float] = deque()
        #: Restarts made so far, in all.
        self.restarts = 0

    def next_delay(self, now: float) -> float | None:
        """Called at a failure (``now``: a monotonic clock): the delay before the restart, or
        None when there is none (``restart = "no"``, or the burst limit is reached). A delay
        returned counts as a restart made."""
        settings = self.settings
        if settings.restart == "no":
            return None
        while self._recent and now - self._recent[0] >= settings.restart_interval:
            self._recent.popleft()
        if len(self._recent) >= settings.restart_burst:
            return None
        delay = min(settings.restart_delay * (1 << min(len(self._recent), 40)),
                    settings.restart_delay_max)
        self._recent.append(now)
        self.restarts += 1
        return delay

    def summary(self) -> str:
        """How the policy ended, for a final failure's message."""
        settings = self.settings
        if settings.restart == "no":
            return "restart = \"no\""
        return (f"restarted {self.restarts} time(s); the limit is {settings.restart_burst}"
                f" within {settings.restart_interval:g} s (restart_burst)")

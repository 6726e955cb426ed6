"""The exit codes of every ``devicehost`` command: one table, used by the CLI, the host and the
docs (``devicehost --help`` prints it; the README's copy is checked against it by a test).

This module is imported by ``devicehost list``; it imports nothing.
"""

from __future__ import annotations

from typing import Final

__all__ = ["ABANDONED", "EXIT_CODES", "FAILED", "NOT_STARTED", "OK", "USAGE"]

#: Success: the command did what it was asked; ``run`` stopped cleanly with every device served.
OK: Final = 0
#: Something failed while working: ``run``: a device failed (the others were served) or the state
#: could not be saved; ``doctor``: a plugin is broken; ``demo``: a device's demo failed;
#: ``inspect``: no host answered on the control socket.
FAILED: Final = 1
#: Bad input, nothing was done or served: an unknown option, an invalid config or saved-state
#: file, or a plugin error under ``--strict``.
USAGE: Final = 2
#: ``run`` did not start serving: no device could be served, or ``--strict`` and a device
#: failed at start.
NOT_STARTED: Final = 3
#: ``run`` was ended by its watchdog: a device's code blocked the event loop (or an abandoned
#: device's task kept the process alive) past the stop deadline after SIGINT/SIGTERM; the log
#: names the device.
ABANDONED: Final = 4

#: (code, meaning) in order, for help texts and docs.
EXIT_CODES: Final = (
    (OK, "success; run: stopped cleanly with every device served"),
    (FAILED, "a failure: run: a device failed (the others were served) or the state could not"
             " be saved; doctor: a plugin is broken; demo: a demo failed; inspect: no answer"),
    (USAGE, "usage or input error, nothing served: bad option, config or state file; plugin"
            " errors under --strict"),
    (NOT_STARTED, "run did not start serving: no device could be served, or --strict and a"
                  " device failed at start"),
    (ABANDONED, "run was ended by its watchdog: a device blocked the event loop past the stop"
                " deadline; the log names it"),
)

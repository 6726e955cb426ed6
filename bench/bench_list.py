# SPDX-License-Identifier: MIT
"""Startup of ``devicehost list --json`` and ``devicehost doctor``, each vs ``import pytest``.

Rows (wall-clock milliseconds of a whole process, median of ``RUNS`` runs each, the commands
interleaved so that load from other processes hits all of them alike):

- ``list_json_startup``: ``devicehost list --json`` with the installed plugins (the four shipped
  ones in a dev install). It reads entry-point metadata only and imports no plugin code. Target
  (reported, never asserted): at most half the time of ``python -c "import pytest"``, i.e.
  ratio <= 0.5.
- ``doctor_startup``: ``devicehost doctor``, which imports and validates every plugin; for
  comparison only.

Baseline: ``python -c "import pytest"`` with the same interpreter, measured in the same run.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["run"]

RUNS = 7


def _devicehost() -> list[str]:
    script = Path(sys.executable).parent / "devicehost"
    return [str(script)] if script.exists() else [sys.executable, "-m", "devicehost.cli"]


def _wall_ms(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, timeout=60)
    return (time.perf_counter() - start) * 1000.0


def run() -> list[dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVICEHOST_")}
    commands = {
        "list": [*_devicehost(), "list", "--json"],
        "doctor": [*_devicehost(), "doctor"],
        "pytest": [sys.executable, "-c", "import pytest"],
    }
    for command in commands.values():  # warm the page cache and .pyc files
        _wall_ms(command, env)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(RUNS):
        for name, command in commands.items():
            times[name].append(_wall_ms(command, env))
    base = statistics.median(times["pytest"])
    rows = []
    for name, row_name in (("list", "list_json_startup"), ("doctor", "doctor_startup")):
        value = statistics.median(times[name])
        rows.append({
            "name": row_name,
            "value": round(value, 2),
            "unit": "ms",
            "baseline_name": "python -c 'import pytest'",
            "baseline_value": round(base, 2),
            "ratio": round(value / base, 3),
        })
    return rows


if __name__ == "__main__":
    import json

    for row in run():
        print(json.dumps(row))

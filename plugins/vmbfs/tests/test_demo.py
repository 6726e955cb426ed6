"""The vmbfs part of ``devicehost demo``."""

from __future__ import annotations

import anyio
import importlib_metadata
import pytest

from devicehost.demo import DemoResult
from devicehost_vmbfs.demo import run_demo


def test_the_demo_entry_point_names_run_demo() -> None:
    eps = importlib_metadata.entry_points(group="devicehost.demo")
    (ep,) = [e for e in eps if e.name == "vmbfs"]
    assert ep.load() is run_demo


@pytest.mark.anyio
async def test_run_demo_reads_everything_back() -> None:
    with anyio.fail_after(30):
        result = await run_demo()
    assert isinstance(result, DemoResult)
    assert result.ok, result.lines
    assert result.bytes_moved == (1 << 20) + 29 + 300_000 + 64_000 + 31
    assert result.lines[0] == "file    /imc.hiv: 1,048,576 bytes in 86 reads, bytes match: yes"
    assert sum("bytes match: yes" in line for line in result.lines) == 5
    assert result.lines[-1] == "escape  /../outside.txt refused: '/../outside.txt': NOT_FOUND"

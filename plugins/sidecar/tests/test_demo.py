"""The sidecar part of ``devicehost demo``."""

from __future__ import annotations

import pytest

from devicehost_sidecar.demo import DemoResult, run_demo


@pytest.mark.anyio
async def test_demo_runs_every_step_and_reports_them() -> None:
    result = await run_demo()
    assert isinstance(result, DemoResult)
    assert result.ok, result.lines
    text = "\n".join(result.lines)
    assert result.lines[0] == "sidecar: simulator with 2 nodes, 4 CPUs"
    assert "HvMessage type 0x80010000, OUT port 0x3f8 size 1 at rip 0x32 (vp 3)" in text
    assert "40 registers set and read back" in text
    assert "translate gva 0x7ffff0000 -> gpa 0x1234000" in text
    assert "CPU 0 (node 0): endless run cancelled" in text
    # 2 x (31 + 9) register assocs of 32 bytes + 4 headers, both ways, plus message and translate
    assert result.bytes_moved >= 40 * 32 * 2
    assert 0 < result.seconds < 10

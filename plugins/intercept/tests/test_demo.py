"""The intercept demo runs for real and reports success."""

from __future__ import annotations

import pytest

from devicehost_intercept.demo import run_demo

pytestmark = pytest.mark.anyio


async def test_demo_reads_the_hive_back_through_stop_start_and_revoke() -> None:
    result = await run_demo()
    assert result.ok, result.lines
    assert result.bytes_moved == 256 * 1024
    text = "\n".join(result.lines)
    for step in ("offer", "claim", "stop", "start", "read", "revoke"):
        assert any(line.startswith(step) for line in result.lines), text
    assert "bytes match: yes" in text

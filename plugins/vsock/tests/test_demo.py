"""The vsock demo runs for real and reports success."""

from __future__ import annotations

import pytest

from devicehost_vsock.demo import run_demo


@pytest.mark.anyio
async def test_demo_passes() -> None:
    result = await run_demo()
    assert result.ok and result.bytes_moved == 4 * 16 * 1024 * 1024
    assert any("OK 1073741824" in line for line in result.lines)

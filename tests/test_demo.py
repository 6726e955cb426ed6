"""The demo runner: one block per device, skipped plugins are not failures, exit status."""

from __future__ import annotations

import io

import pytest

from devicehost.demo import DemoResult, run_demos


async def _good() -> DemoResult:
    return DemoResult(ok=True, lines=["read 3 files"], bytes_moved=2_000_000, seconds=0.5)


async def _bad() -> DemoResult:
    return DemoResult(ok=False, lines=["bytes differ"])


async def _raises() -> DemoResult:
    raise RuntimeError("socket gone")


@pytest.mark.anyio
async def test_all_pass_with_skips_exits_zero() -> None:
    out = io.StringIO()
    status = await run_demos({"vmbfs": _good, "vsock": "not installed"}, out)
    text = out.getvalue()
    assert status == 0
    assert "== vmbfs\n   read 3 files\n" in text
    assert "2,000,000 bytes in 0.50 s (4.0 MB/s)" in text
    assert "== vsock\n   skipped: not installed\n" in text
    assert "1 of 1 device demos passed\n" in text


@pytest.mark.anyio
async def test_a_failing_or_raising_demo_fails_the_run() -> None:
    out = io.StringIO()
    status = await run_demos({"vmbfs": _good, "vsock": _bad, "sidecar": _raises}, out)
    text = out.getvalue()
    assert status == 1
    assert "   error: RuntimeError: socket gone\n   result: FAIL" in text
    assert "1 of 3 device demos passed; failed: vsock, sidecar" in text


@pytest.mark.anyio
async def test_nothing_ran_is_a_failure() -> None:
    out = io.StringIO()
    assert await run_demos({"vmbfs": "not installed"}, out) == 1

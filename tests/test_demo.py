"""The demo runner: one block per device, skipped plugins are not failures, exit status."""

from __future__ import annotations

import io

import pytest

from devicehost.demo import DemoResult, _failing, run_demos


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


@pytest.mark.anyio
async def test_a_demo_that_cannot_load_fails_rather_than_skips() -> None:
    out = io.StringIO()
    status = await run_demos({"vsock": _failing("cannot load its demo: ImportError: x")}, out)
    assert status == 1
    assert "error: RuntimeError: cannot load its demo: ImportError: x" in out.getvalue()
    assert "result: FAIL" in out.getvalue()


def test_the_demos_import_no_test_tools() -> None:
    import subprocess
    import sys

    code = (
        "import sys, importlib_metadata\n"
        "for ep in importlib_metadata.entry_points(group='devicehost.demo'): ep.load()\n"
        "print(sorted(m for m in ('pytest', 'hypothesis') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", "a demo must run where only the runtime is installed"


def test_a_loaded_device_without_a_demo_is_listed_as_no_demo() -> None:
    from devicehost.demo import _demo_functions

    demos = _demo_functions({"vmbfs", "homegrown"})
    assert demos["homegrown"] == "no demo (the plugin has no 'devicehost.demo' entry point)"
    assert callable(demos["vmbfs"])
    assert demos["sidecar"] == "plugin not loaded"


@pytest.mark.parametrize(("term", "tty", "redraw"),
                         [("xterm", True, True), ("dumb", True, False), ("xterm", False, False)])
def test_the_progress_line_respects_term_dumb(term: str, tty: bool, redraw: bool) -> None:
    from devicehost.demo import _can_redraw

    class Stream(io.StringIO):
        def isatty(self) -> bool:
            return tty

    assert _can_redraw(Stream(), {"TERM": term}) is redraw


@pytest.mark.anyio
async def test_devicehost_trace_traces_the_hosts_a_demo_builds(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from typing import Any

    from devicehost import DeviceContext, LocalOffer, hookimpl
    from devicehost.testing import host_with

    class Quiet:
        def __init__(self, config: Any) -> None:
            pass

        @hookimpl
        def offer(self, ctx: DeviceContext) -> LocalOffer:
            return LocalOffer({})

    monkeypatch.setenv("DEVICEHOST_TRACE", "1")
    with caplog.at_level("INFO", logger="devicehost.trace"):
        async with host_with({"quiet": Quiet}):
            pass
    assert any(r.name == "devicehost.trace" and "device 'quiet': offer returned" in r.getMessage()
               for r in caplog.records)

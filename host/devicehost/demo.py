"""``devicehost demo``: exercise every loaded device that ships a demo and print a report.

Each device plugin contributes its part through an entry point of group ``devicehost.demo``
naming an async function ``run_demo() -> result``; the result has ``ok`` (bool), ``lines``
(human-readable lines), ``bytes_moved`` (int) and ``seconds`` (float) — see :class:`DemoResult`.
A demo runs the host with a guest simulated in the same process (real shared-memory rings, Unix
sockets and files; the guest side is Python). A shipped device whose plugin is not installed (or
not loaded) is listed as skipped, not failed; a loaded device plugin without a demo entry point
is listed as "no demo". The command exits 0 only if every demo that ran reported success.

The report goes to ``out`` (stdout); the progress line goes to stderr, only when it is a
terminal that can redraw a line (not ``TERM=dumb``); log records go to stderr.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, TextIO

import anyio
import attrs

__all__ = ["SHIPPED_DEVICES", "DemoResult", "main", "run_demos"]

#: The devices that ship with devicehost, in the order the demo runs them.
SHIPPED_DEVICES: Final = ("vmbfs", "intercept", "vsock", "sidecar")

#: Longest time one device's demo may take before it is reported as failed.
DEMO_TIMEOUT: Final = 120.0


@attrs.frozen
class DemoResult:
    """What one device's demo did."""

    ok: bool
    lines: list[str] = attrs.field(factory=list)
    bytes_moved: int = 0
    seconds: float = 0.0


def _demo_functions(loaded: set[str]) -> dict[str, Callable[[], Awaitable[Any]] | str]:
    """Plugin name -> its demo function, or the reason it is skipped; every loaded device
    plugin is named (``no demo`` when it has none)."""
    import importlib_metadata

    found: dict[str, Callable[[], Awaitable[Any]] | str] = {}
    for ep in importlib_metadata.entry_points(group="devicehost.demo"):
        if ep.name not in loaded:
            found[ep.name] = "plugin not loaded"
            continue
        try:
            found[ep.name] = ep.load()
        except Exception as exc:
            # An installed plugin whose demo cannot load is broken, not skipped: it fails.
            found[ep.name] = _failing(f"cannot load its demo: {type(exc).__name__}: {exc}")
    for name in SHIPPED_DEVICES:
        if name not in loaded:
            found.setdefault(name, f"not installed (pip install ./plugins/{name})")
    for name in sorted(loaded):
        found.setdefault(name, "no demo (the plugin has no 'devicehost.demo' entry point)")
    return found


def _failing(why: str) -> Callable[[], Awaitable[Any]]:
    async def fail() -> Any:
        raise RuntimeError(why)

    return fail


def _rate(result: Any) -> str:
    seconds = float(getattr(result, "seconds", 0.0))
    moved = int(getattr(result, "bytes_moved", 0))
    if moved <= 0 or seconds <= 0:
        return f"{seconds:.2f} s"
    return f"{moved:,} bytes in {seconds:.2f} s ({moved / seconds / 1e6:.1f} MB/s)"


async def _progress(name: str, out: TextIO, started: float) -> None:
    while True:
        out.write(f"\r  running {name} ... {time.perf_counter() - started:5.1f} s")
        out.flush()
        await anyio.sleep(0.1)


async def run_demos(
    demos: Mapping[str, Callable[[], Awaitable[Any]] | str],
    out: TextIO,
    *,
    progress: TextIO | None = None,
) -> int:
    """Run each demo, print a block per device, return the exit status."""
    order = [n for n in SHIPPED_DEVICES if n in demos] + sorted(
        n for n in demos if n not in SHIPPED_DEVICES
    )
    failed: list[str] = []
    ran = 0
    for name in order:
        fn = demos[name]
        out.write(f"== {name}\n")
        if isinstance(fn, str):
            out.write(f"   skipped: {fn}\n")
            continue
        ran += 1
        started = time.perf_counter()
        result: Any = None
        error = ""
        async with anyio.create_task_group() as tg:
            if progress is not None:
                tg.start_soon(_progress, name, progress, started)
            try:
                with anyio.fail_after(DEMO_TIMEOUT):
                    result = await fn()
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            tg.cancel_scope.cancel()
        if progress is not None:
            progress.write("\r" + " " * 60 + "\r")
            progress.flush()
        ok = result is not None and bool(getattr(result, "ok", False)) and not error
        for line in getattr(result, "lines", []) or []:
            out.write(f"   {line}\n")
        if error:
            out.write(f"   error: {error}\n")
        if result is not None:
            out.write(f"   moved: {_rate(result)}\n")
        out.write(f"   result: {'PASS' if ok else 'FAIL'}\n")
        if not ok:
            failed.append(name)
    out.write(f"\n{ran - len(failed)} of {ran} device demos passed")
    out.write(f"; failed: {', '.join(failed)}\n" if failed else "\n")
    return 1 if failed or ran == 0 else 0


def _can_redraw(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """True if ``stream`` is a terminal that can redraw a line (``\r``): not ``TERM=dumb``."""
    return stream.isatty() and environ.get("TERM", "") not in ("dumb", "")


def main(registry: Any, out: TextIO | None = None) -> int:
    """Run the demo of every device plugin loaded in ``registry``."""
    out = out or sys.stdout
    loaded = set(getattr(registry, "device_classes", {}))
    demos = _demo_functions(loaded)
    progress = sys.stderr if _can_redraw(sys.stderr, os.environ) else None
    status: int = anyio.run(lambda: run_demos(demos, out, progress=progress))
    return status

# SPDX-License-Identifier: MIT
"""Run the benchmarks: ``python bench/run.py [NAME...] [--json] [--list]``.

A benchmark is a module ``bench/bench_<NAME>.py`` with ``run() -> list[dict]``; each dict has
exactly the keys ``name``, ``value``, ``unit``, ``baseline_name``, ``baseline_value``, ``ratio``
(the baseline is measured in the same run). With no NAME every benchmark runs, in name order.

Each benchmark runs in a fresh interpreter (this script, re-invoked with ``--child NAME``), so one
benchmark's imports, threads and garbage never skew another's numbers and a crash is reported
against the benchmark that crashed. With ``--json`` every result is printed as one JSON object
per line on stdout; without it, as a table. A benchmark that fails, times out or returns a
malformed row is reported on stderr and makes the exit status 1; the others still run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Final

BENCH_DIR: Final = Path(__file__).resolve().parent
KEYS: Final = ("name", "value", "unit", "baseline_name", "baseline_value", "ratio")
#: Longest time one benchmark module may take.
TIMEOUT: Final = 600.0


def available() -> dict[str, Path]:
    """Benchmark name -> module path, for every ``bench_*.py`` beside this script."""
    return {p.stem.removeprefix("bench_"): p for p in sorted(BENCH_DIR.glob("bench_*.py"))}


def check_row(row: Any) -> dict[str, Any]:
    """Return ``row`` if it is a well-formed result, else raise ValueError saying why."""
    if not isinstance(row, dict):
        raise ValueError(f"a result must be a dict, got {type(row).__name__}")
    if set(row) != set(KEYS):
        raise ValueError(f"a result must have exactly the keys {list(KEYS)}, got {sorted(row)}")
    for key in ("name", "unit", "baseline_name"):
        if not isinstance(row[key], str):
            raise ValueError(f"{key} must be a string, got {row[key]!r}")
    for key in ("value", "baseline_value", "ratio"):
        value = row[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
            value
        ):
            raise ValueError(f"{key} must be a finite number, got {value!r}")
    return {k: row[k] for k in KEYS}


def run_child(name: str) -> int:
    """Import one benchmark module, run it, print its rows as JSON lines."""
    path = available()[name]
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    for row in module.run():
        print(json.dumps(row), flush=True)
    return 0


def run_one(name: str) -> tuple[list[dict[str, Any]], str | None, float]:
    """Run benchmark ``name`` in a child interpreter: its rows, an error or None, seconds."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", name],
            capture_output=True, text=True, timeout=TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        return [], f"timed out after {TIMEOUT:.0f} s", time.perf_counter() - start
    elapsed = time.perf_counter() - start
    rows: list[dict[str, Any]] = []
    try:
        for line in proc.stdout.splitlines():
            if line.strip():
                rows.append(check_row(json.loads(line)))
    except ValueError as exc:
        return rows, f"malformed result: {exc}", elapsed
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        return rows, f"exited with status {proc.returncode}:\n{tail}", elapsed
    if not rows:
        return rows, "returned no results", elapsed
    return rows, None, elapsed


def _number(value: float) -> str:
    return f"{value:,.3f}" if abs(value) < 1000 else f"{value:,.0f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    table = [("benchmark", "value", "unit", "baseline", "baseline value", "ratio")]
    table += [
        (r["name"], _number(r["value"]), r["unit"], r["baseline_name"],
         _number(r["baseline_value"]), f"{r['ratio']:.3f}")
        for r in rows
    ]
    widths = [max(len(row[c]) for row in table) for c in range(len(table[0]))]
    right = {1, 4, 5}
    for row in table:
        cells = [
            row[c].rjust(widths[c]) if c in right else row[c].ljust(widths[c])
            for c in range(len(row))
        ]
        print("  ".join(cells).rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (default all)")
    parser.add_argument("--json", action="store_true", help="one JSON object per result line")
    parser.add_argument("--list", action="store_true", help="list the benchmark names")
    parser.add_argument("--child", metavar="NAME", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    found = available()
    if args.child is not None:
        return run_child(args.child)
    if args.list:
        print("\n".join(found))
        return 0
    unknown = [n for n in args.names if n not in found]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(found)}")
    status = 0
    collected: list[dict[str, Any]] = []
    for name in args.names or list(found):
        rows, error, elapsed = run_one(name)
        for row in rows:
            if args.json:
                print(json.dumps(row), flush=True)
        collected += rows
        if error is not None:
            status = 1
            print(f"bench {name}: {error}", file=sys.stderr, flush=True)
        elif not args.json:
            print(f"bench {name}: {len(rows)} results in {elapsed:.1f} s", file=sys.stderr,
                  flush=True)
    if not args.json and collected:
        print_table(collected)
    return status


if __name__ == "__main__":
    raise SystemExit(main())

"""The ``devicehost`` command.

``devicehost [-p NAME | -p no:NAME]... [--strict] [-v] COMMAND``; the plugin options may also follow
the command (``devicehost list -p no:vsock``).

- ``list [--json] [--load]``: installed plugins and their status. Reads metadata only (imports no
  plugin code) unless ``--load``, which imports the selected plugins as ``doctor`` does.
- ``doctor [--config FILE]``: imports every selected plugin; exits 1 naming each broken one, else
  0. Also reports the file descriptor limit against what the devices of FILE (default: one of
  each plugin) can hold (:mod:`devicehost.fdlimit`); a low limit is a warning, not a failure.
- ``run [--config FILE] [--state FILE]``: serves the configured devices (default: one device of
  each loaded device plugin) until SIGINT/SIGTERM; the exit code is the host's. ``--state``
  restores from FILE if it exists and saves to it (atomically) on the graceful stop; what is
  restored across processes is described in :mod:`devicehost.host`. It first raises its soft file
  descriptor limit to the hard one (logged).
- ``demo``: the host plus an embedded guest exercising every installed device.

``DEVICEHOST_TRACE=1`` adds the tracing plugin (:mod:`devicehost.tracing`) to ``run``: every hook
call of every device is logged with the device's name and its duration.

Exit codes: 0 success, 1 a plugin/config/host failure (the message says which), 2 usage error or
a ``--state`` file that cannot be restored (nothing was served).
Heavy modules (anyio, the host, config) are imported only by the commands that need them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from devicehost import __version__
from devicehost.errors import DeviceHostError, SavedStateError

if TYPE_CHECKING:
    from devicehost.plugins import PluginInfo, Registry

__all__ = ["main"]


def _plugin_options(parser: argparse.ArgumentParser, dest: str) -> None:
    parser.add_argument(
        "-p",
        dest=dest,
        action="append",
        default=[],
        metavar="NAME",
        help="load plugin NAME even if not autoloaded; 'no:NAME' blocks it before import"
        " (entry-point or distribution name; repeatable)",
    )
    parser.add_argument(
        "--strict",
        dest=f"{dest}_strict",
        action="store_true",
        help="treat any plugin error as a failure",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="devicehost", description="A plugin-based host for virtual devices."
    )
    parser.add_argument("--version", action="version", version=f"devicehost {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    _plugin_options(parser, "plugins")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_list = sub.add_parser("list", help="list installed plugins and their status")
    p_list.add_argument("--json", action="store_true", help="print a JSON array of objects")
    p_list.add_argument(
        "--load", action="store_true", help="import the plugins to report their real status"
    )
    p_doctor = sub.add_parser("doctor", help="import every plugin; exit 1 if any is broken")
    p_doctor.add_argument("--config", metavar="FILE", help="also check the file descriptor"
                          " limit against this config's devices (default: one of each plugin)")
    p_run = sub.add_parser("run", help="serve the configured devices until SIGINT/SIGTERM")
    p_run.add_argument("--config", metavar="FILE", help="TOML config file (default: one device"
                       " of each installed plugin)")
    p_run.add_argument("--state", metavar="FILE", help="restore from FILE if it exists; save to"
                       " it on SIGINT/SIGTERM")
    p_demo = sub.add_parser("demo", help="run the host with an embedded guest and report")
    for p in (p_list, p_doctor, p_run, p_demo):
        _plugin_options(p, "sub_plugins")
    return parser


def _print_table(infos: Sequence[PluginInfo]) -> None:
    rows = [("NAME", "DISTRIBUTION", "VERSION", "STATUS", "ERROR")]
    rows += [(i.name, i.distribution, i.version, i.status, i.error or "") for i in infos]
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    for row in rows:
        cells = [row[c].ljust(widths[c]) for c in range(4)]
        print("  ".join([*cells, row[4]]).rstrip())


def _cmd_list(args: argparse.Namespace, plugin_args: list[str], strict: bool) -> int:
    from devicehost import plugins

    if args.load:
        registry = plugins.load_plugins(plugin_args)
        infos, missing = registry.infos, registry.missing
    else:
        infos = plugins.list_plugins(plugin_args)
        missing = []
    if args.json:
        print(json.dumps([i.to_json() for i in infos], indent=None))
    elif infos:
        _print_table(infos)
    else:
        print("no devicehost plugins are installed")
    if strict and (missing or any(i.status == "error" for i in infos)):
        print("devicehost: error: plugin errors (strict mode)", file=sys.stderr)
        return 1
    return 0


def _cmd_doctor(plugin_args: list[str], config_path: str | None = None) -> int:
    from devicehost.plugins import load_plugins

    registry = load_plugins(plugin_args)
    for info in registry.infos:
        line = f"{info.status:8} {info.name} ({info.distribution} {info.version})"
        print(f"{line}: {info.error}" if info.error else line)
    problems = registry.problems()
    if problems:
        print(f"{len(problems)} broken:")
        for problem in problems:
            print(f"  {problem}")
        return 1
    loaded = sum(1 for i in registry.infos if i.status == "loaded")
    print(f"all {loaded} loaded plugins are healthy")
    _print_fd_budget(registry, config_path)
    _print_accelerators()
    return 0


def _print_fd_budget(registry: Registry, config_path: str | None) -> None:
    # Informational like the accelerators: a low limit makes connections wait, never fails one.
    from devicehost.config import default_config, load_config
    from devicehost.fdlimit import fd_budget

    config = default_config(registry) if config_path is None else load_config(
        config_path, registry
    )
    for line in fd_budget(registry, config).report():
        print(line)


def _print_accelerators() -> None:
    # Informational: a missing accelerator makes devicehost slower, never wrong.
    from devicehost import accel

    for name, state in accel.status().items():
        print(f"accelerator {name} ({accel.ACCELERATORS[name]}): {state}")


def _load_registry(plugin_args: list[str], strict: bool) -> Registry:
    from devicehost.plugins import load_plugins

    registry = load_plugins(plugin_args, strict=strict)
    for problem in registry.problems():
        print(f"devicehost: warning: plugin {problem}", file=sys.stderr)
    return registry


def _cmd_run(args: argparse.Namespace, plugin_args: list[str], strict: bool) -> int:
    import functools

    import anyio

    from devicehost.config import default_config, load_config
    from devicehost.fdlimit import log_raised_soft_limit
    from devicehost.host import run_host
    from devicehost.tracing import tracing_plugins

    log_raised_soft_limit()
    registry = _load_registry(plugin_args, strict)
    config = default_config(registry) if args.config is None else load_config(
        args.config, registry
    )
    options: dict[str, Any] = {"cross_cutting": tracing_plugins()}
    if args.state is not None:
        options["state_file"] = args.state
    serve = functools.partial(run_host, **options)
    try:
        return anyio.run(serve, registry, config)
    except SavedStateError as exc:
        print(f"devicehost: error: {exc}", file=sys.stderr)
        return 2


def _cmd_demo(plugin_args: list[str], strict: bool) -> int:
    from devicehost.demo import main as demo_main

    return demo_main(_load_registry(plugin_args, strict))


def _configure_logging(verbose: bool, *, quiet: bool) -> None:
    import logging

    logging.basicConfig(
        level=logging.DEBUG if verbose else (logging.ERROR if quiet else logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``devicehost`` command; returns the exit code."""
    args = _parser().parse_args(argv)
    plugin_args = [*args.plugins, *args.sub_plugins]
    strict = bool(args.plugins_strict or args.sub_plugins_strict)
    # ``list`` reads metadata only and never logs: it does not even import logging.
    if args.command != "list" or args.load or args.verbose:
        _configure_logging(args.verbose, quiet=args.command in ("list", "doctor"))
    try:
        if args.command == "list":
            return _cmd_list(args, plugin_args, strict)
        if args.command == "doctor":
            return _cmd_doctor(plugin_args, args.config)
        if args.command == "run":
            return _cmd_run(args, plugin_args, strict)
        return _cmd_demo(plugin_args, strict)
    except DeviceHostError as exc:
        print(f"devicehost: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

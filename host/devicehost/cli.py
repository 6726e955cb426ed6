"""The ``devicehost`` command.

``devicehost [-p NAME | -p no:NAME]... [--strict] [-v] COMMAND``; the plugin options and ``-v`` may
also follow the command (``devicehost list -p no:vsock``, ``devicehost run -v``). Bare
``devicehost`` prints the help.

- ``list [--json] [--load]``: installed plugins and their status. Reads metadata only (imports no
  plugin code; a selected plugin is ``available``) unless ``--load``, which imports the selected
  plugins as ``doctor`` does (``loaded`` or ``error``).
- ``doctor [--json] [--config FILE]``: imports every selected plugin; exits 1 naming each broken
  one, else 0. Also reports the file descriptor limit against what the devices of FILE (default:
  one of each plugin) can hold (:mod:`devicehost.fdlimit`); a low limit is a warning, not a
  failure.
- ``run [--config FILE] [--state FILE] [--takeover]``: serves the configured devices (default:
  one device of each loaded device plugin) until SIGINT/SIGTERM
  (:func:`devicehost.serving.run_host`).
  It first raises its soft file descriptor limit to the hard one (logged). ``--takeover`` takes
  the devices over live from the host running with the same config (``docs/servicing.md``).
- ``inspect --socket PATH [--json]``: the running host's device tree, over its control socket.
- ``demo``: the host plus an embedded guest exercising every installed device.

The exit codes are :mod:`devicehost.exitcodes`' table, printed by ``devicehost --help``. Warnings
and errors go to stderr as one line each (``devicehost: warning: ...``); tracebacks only with
``-v``. Heavy modules (anyio, the host, config) are imported only by the commands that need them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from devicehost import __version__, exitcodes
from devicehost.errors import (
    ConfigError,
    DeviceHostError,
    PluginError,
    SavedStateError,
)

if TYPE_CHECKING:
    from devicehost.plugins import PluginInfo, Registry

__all__ = ["ENVIRONMENT", "main"]

#: The environment variables devicehost reads, for the help text and the README.
ENVIRONMENT = (
    ("DEVICEHOST_DISABLE_PLUGIN_AUTOLOAD=1",
     "load no plugin unless named with -p NAME or in DEVICEHOST_LOAD_PLUGINS"),
    ("DEVICEHOST_LOAD_PLUGINS=a,b", "load only these plugins (entry-point or distribution names)"),
    ("DEVICEHOST_TRACE=1", "log every hook call of every device with its duration (run, demo)"),
    ("DEVICEHOST_PURE_PYTHON=1", "turn off the optional C accelerators (same behaviour, slower)"),
    ("NOTIFY_SOCKET", "set by systemd (Type=notify): run reports READY=1, STOPPING=1, STATUS="),
)


def _epilog() -> str:
    lines = ["environment variables:"]
    lines += [f"  {name:38} {what}" for name, what in ENVIRONMENT]
    lines += ["", "exit codes:"]
    lines += [f"  {code}  {what}" for code, what in exitcodes.EXIT_CODES]
    return "\n".join(lines)


def _common_options(parser: argparse.ArgumentParser, suffix: str) -> None:
    parser.add_argument(
        "-p",
        dest=f"plugins{suffix}",
        action="append",
        default=[],
        metavar="NAME",
        help="load plugin NAME even if not autoloaded; 'no:NAME' blocks it before import"
        " (entry-point or distribution name; repeatable)",
    )
    parser.add_argument(
        "--strict",
        dest=f"strict{suffix}",
        action="store_true",
        help="any plugin error, unknown plugin name or device that fails to start is fatal",
    )
    parser.add_argument("-v", "--verbose", dest=f"verbose{suffix}", action="store_true",
                        help="log debug messages and tracebacks")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="devicehost", description="A plugin-based host for virtual devices.",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"devicehost {__version__}")
    _common_options(parser, "")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=summary, description=description,
                           epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
        _common_options(p, "_sub")
        return p

    p_list = command("list", "list installed plugins and their status",
                     "List the installed devicehost plugins from their metadata, importing no"
                     " plugin code: a selected plugin whose metadata is sound is 'available'."
                     " With --load, import them and report 'loaded' or 'error'.")
    p_list.add_argument("--json", action="store_true",
                        help="print one JSON array with an object per plugin")
    p_list.add_argument("--load", action="store_true",
                        help="import the plugins to report their real status")
    p_doctor = command("doctor", "import every plugin; exit 1 if any is broken",
                       "Import and validate every selected plugin; name each broken one (exit 1)."
                       " Also says which C accelerators are in use.")
    p_doctor.add_argument("--json", action="store_true",
                          help="print one JSON object: plugins, problems, accelerators")
    p_doctor.add_argument("--config", metavar="FILE", help="also check the file descriptor"
                          " limit against this config's devices (default: one of each plugin)")
    p_run = command("run", "serve the configured devices until SIGINT/SIGTERM",
                    "Serve the configured devices until SIGINT/SIGTERM, then stop them"
                    " gracefully. Logs one 'ready:' line per device (where it is reached), a"
                    " summary and 'ready'; speaks sd_notify when NOTIFY_SOCKET is set.")
    p_run.add_argument("--config", metavar="FILE", help="TOML config file (default: one device"
                       " of each installed plugin)")
    p_run.add_argument("--state", metavar="FILE", help="restore from FILE if it exists; save to"
                       " it on SIGINT/SIGTERM")
    p_run.add_argument("--takeover", action="store_true", help="take every device over, live,"
                       " from the host running with this config (on its [host] control_socket;"
                       " docs/servicing.md); exit 3 naming the device if one cannot be restored"
                       " (the running host then serves on)")
    p_inspect = command("inspect", "print the running host's device tree",
                        "Ask a running host, over its control socket ([host] control_socket),"
                        " for its device tree: state, offer, transport endpoints, connections,"
                        " queues and counters.")
    p_inspect.add_argument("--socket", metavar="PATH", required=True,
                           help="the host's control socket")
    p_inspect.add_argument("--json", action="store_true", help="print the tree as JSON")
    command("demo", "run the host with an embedded guest and report",
            "Exercise every loaded device plugin that ships a demo (entry point group"
            " 'devicehost.demo') against a guest simulated in this process, and print a report."
            " Exit 0 only if every demo that ran passed.")
    return parser


def _warn(message: str) -> None:
    print(f"devicehost: warning: {message}", file=sys.stderr)


def _error(message: str) -> None:
    print(f"devicehost: error: {message}", file=sys.stderr)


def _print_table(infos: Sequence[PluginInfo]) -> None:
    rows = [("NAME", "DISTRIBUTION", "VERSION", "STATUS", "ERROR")]
    rows += [(i.name, i.distribution, i.version, i.status, i.error or "") for i in infos]
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    for row in rows:
        cells = [row[c].ljust(widths[c]) for c in range(4)]
        print("  ".join([*cells, row[4]]).rstrip())


def _selection_problems(unknown: Sequence[str], strict: bool) -> int | None:
    """Warn about selection names that match nothing; under strict, the exit code."""
    if strict and unknown:
        _error("plugin errors (strict mode):\n  " + "\n  ".join(unknown))
        return exitcodes.USAGE
    for line in unknown:
        _warn(f"plugin {line}")
    return None


def _cmd_list(args: argparse.Namespace, plugin_args: list[str], strict: bool) -> int:
    from devicehost import plugins

    if args.load:
        registry = plugins.load_plugins(plugin_args)
        infos, unknown = registry.infos, registry.unknown
    else:
        infos, unknown = plugins.list_selection(plugin_args)
    if args.json:
        print(json.dumps([i.to_json() for i in infos], indent=None))
    elif infos:
        _print_table(infos)
    else:
        print("no devicehost plugins are installed")
    if strict and any(i.status == "error" for i in infos):
        _error("plugin errors (strict mode)")
        return exitcodes.USAGE
    code = _selection_problems(unknown, strict)
    return exitcodes.OK if code is None else code


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _cmd_doctor(args: argparse.Namespace, plugin_args: list[str]) -> int:
    from devicehost import accel
    from devicehost.plugins import load_plugins

    registry = load_plugins(plugin_args)
    problems = registry.problems()
    accelerators = accel.status()
    if args.json:
        print(json.dumps({
            "plugins": [{**i.to_json(), "kind": i.kind} for i in registry.infos],
            "problems": problems,
            "fd_limit": [] if problems else _fd_budget(registry, args.config),
            "accelerators": accelerators,
            "healthy": not problems,
        }))
        return exitcodes.FAILED if problems else exitcodes.OK
    for info in registry.infos:
        line = f"{info.status:8} {info.name} ({info.distribution} {info.version})"
        print(f"{line}: {info.error}" if info.error else line)
    if problems:
        print(f"{len(problems)} broken:")
        for problem in problems:
            print(f"  {problem}")
        return exitcodes.FAILED
    loaded = sum(1 for i in registry.infos if i.status == "loaded")
    if loaded == 0:
        print("no plugin is loaded (see devicehost list)")
    else:
        print(f"{_plural(loaded, 'loaded plugin')}: all healthy")
    for line in _fd_budget(registry, args.config):
        print(line)
    # Informational: a missing accelerator makes devicehost slower, never wrong.
    for name, state in accelerators.items():
        print(f"accelerator {name} ({accel.ACCELERATORS[name]}): {state}")
    return exitcodes.OK


def _fd_budget(registry: Registry, config_path: str | None) -> list[str]:
    # Informational like the accelerators: a low limit makes connections wait, never fails one.
    from devicehost.config import default_config, load_config
    from devicehost.fdlimit import fd_budget

    config = default_config(registry) if config_path is None else load_config(
        config_path, registry
    )
    return list(fd_budget(registry, config).report())


def _load_registry(plugin_args: list[str], strict: bool) -> Registry:
    from devicehost.plugins import load_plugins

    registry = load_plugins(plugin_args, strict=strict)
    for problem in registry.problems():
        _warn(f"plugin {problem}")
    return registry


def _cmd_run(args: argparse.Namespace, plugin_args: list[str], strict: bool) -> int:
    import functools

    import anyio

    from devicehost.config import default_config, load_config
    from devicehost.fdlimit import log_raised_soft_limit
    from devicehost.serving import run_host
    from devicehost.tracing import tracing_plugins
    from devicehost.watchdog import Watchdog

    log_raised_soft_limit()
    registry = _load_registry(plugin_args, strict)
    if args.config is None:
        config = default_config(registry)
        if not config.devices:
            _warn(f"no device plugin is loaded ({_why_no_plugins(registry)}): nothing to serve")
    else:
        config = load_config(args.config, registry)
    options: dict[str, Any] = {"cross_cutting": tracing_plugins()}
    if args.state is not None:
        options["state_file"] = args.state
    if args.takeover:
        options["takeover"] = True
    if strict:
        options["strict"] = True
    # The watchdog keeps the host stoppable when a plugin blocks the event loop.
    watchdog = Watchdog(config.host.stop_deadline)
    serve = functools.partial(run_host, watchdog=watchdog, **options)
    with watchdog:
        code: int = anyio.run(serve, registry, config)
        return watchdog.finish(code)


def _why_no_plugins(registry: Registry) -> str:
    import os

    if not registry.infos:
        return "no devicehost plugins are installed"
    blocked = [i for i in registry.infos if i.status == "blocked"]
    if blocked and len(blocked) == len(registry.infos):
        return f"every installed plugin is blocked: {blocked[0].error}"
    if os.environ.get("DEVICEHOST_LOAD_PLUGINS") is not None:
        return "DEVICEHOST_LOAD_PLUGINS selects none of the installed device plugins"
    return "no installed plugin is a loadable device plugin (see devicehost doctor)"


def _cmd_inspect(args: argparse.Namespace) -> int:
    from devicehost.control import request

    tree = request(args.socket, "inspect")
    if args.json:
        print(json.dumps(tree, indent=2, sort_keys=False))
    else:
        _print_tree(tree)
    return exitcodes.OK


def _print_tree(tree: Any) -> None:
    devices = tree.get("devices", []) if isinstance(tree, dict) else []
    for device in devices:
        print(f"{device.get('name')} ({device.get('plugin')}): {device.get('state')},"
              f" runs {device.get('runs')}")
        for key, value in device.items():
            if key not in ("name", "plugin", "state", "runs"):
                _print_value(key, value, 1)
    failures = tree.get("failures", {}) if isinstance(tree, dict) else {}
    for name, why in failures.items():
        print(f"{name}: not served: {why}")
    if not devices and not failures:
        print("the host serves no device")


def _print_value(key: str, value: Any, depth: int) -> None:
    pad = "  " * depth
    if isinstance(value, dict) and value:
        print(f"{pad}{key}:")
        for k, v in value.items():
            _print_value(str(k), v, depth + 1)
    elif isinstance(value, list) and value and any(isinstance(v, dict) for v in value):
        print(f"{pad}{key}:")
        for index, item in enumerate(value):
            _print_value(f"[{index}]", item, depth + 1)
    else:
        print(f"{pad}{key}: {json.dumps(value, default=str)}")


def _cmd_demo(plugin_args: list[str], strict: bool) -> int:
    from devicehost.demo import main as demo_main

    registry = _load_registry(plugin_args, strict)
    if not registry.device_classes:
        _error(f"no device plugin is loaded ({_why_no_plugins(registry)}): nothing to demo")
        return exitcodes.FAILED
    return demo_main(registry)


def _configure_logging(verbose: bool, level: int) -> None:
    import logging

    class OneLine(logging.Formatter):
        """Leaves tracebacks out unless verbose: the message already names the error."""

        def format(self, record: logging.LogRecord) -> str:
            if verbose or not (record.exc_info or record.stack_info):
                return super().format(record)
            plain = logging.makeLogRecord(record.__dict__)
            plain.exc_info = plain.exc_text = plain.stack_info = None
            return super().format(plain)

    handler = logging.StreamHandler()
    handler.setFormatter(OneLine("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else level, handlers=[handler])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``devicehost`` command; returns the exit code (:mod:`devicehost.exitcodes`)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return exitcodes.OK
    plugin_args = [*args.plugins, *args.plugins_sub]
    strict = bool(args.strict or args.strict_sub)
    verbose = bool(args.verbose or args.verbose_sub)
    # ``list`` reads metadata only and never logs: it does not even import logging.
    if args.command != "list" or args.load or verbose:
        import logging

        level = {"list": logging.ERROR, "doctor": logging.ERROR, "inspect": logging.ERROR,
                 "demo": logging.WARNING}.get(args.command, logging.INFO)
        _configure_logging(verbose, level)
        if args.command == "demo":
            logging.getLogger("devicehost.trace").setLevel(logging.INFO)
    try:
        if args.command == "list":
            return _cmd_list(args, plugin_args, strict)
        if args.command == "doctor":
            return _cmd_doctor(args, plugin_args)
        if args.command == "run":
            return _cmd_run(args, plugin_args, strict)
        if args.command == "inspect":
            return _cmd_inspect(args)
        return _cmd_demo(plugin_args, strict)
    except (ConfigError, SavedStateError, PluginError) as exc:
        _error(str(exc))
        return exitcodes.USAGE
    except DeviceHostError as exc:
        _error(str(exc))
        return exitcodes.FAILED


if __name__ == "__main__":
    raise SystemExit(main())

"""``devicehost run``: serve a host until it is told to stop, as a well-kept service.

:func:`run_host` builds and serves the configured devices (:func:`devicehost.host.open_host`),
announces readiness (log lines, sd_notify), serves the control socket, waits for SIGINT/SIGTERM
or for a takeover to commit, and stops; its return value is the process exit code
(:mod:`devicehost.exitcodes`).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from devicehost.config import HostSettings
from devicehost.errors import (
    ConfigError,
    DeviceHostError,
    StartupError,
)
from devicehost.handoff import HandoffError

if TYPE_CHECKING:
    from devicehost.notify import Notifier
    from devicehost.watchdog import Watchdog

from devicehost.host import Host, open_host
from devicehost.statefile import read_state_file, remove_stale_temporaries, write_state_file

__all__ = ["run_host"]

log = logging.getLogger("devicehost.host")


async def _until_stopped(host: Host, signals: Any) -> None:
    """Wait for SIGINT/SIGTERM or for a takeover to commit; a signal that arrives during a
    takeover waits for it to end (the stop never interrupts a handoff half-way)."""
    servicing = host.servicing
    async with anyio.create_task_group() as tg:
        if servicing is not None:
            async def handed_over() -> None:
                await servicing.handed_over.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(handed_over)
        async for signum in signals:
            log.info("received %s, stopping devices", signal.Signals(signum).name)
            break
        tg.cancel_scope.cancel()
    if servicing is not None and not servicing.handed_over.is_set():
        async with servicing.lock:
            servicing.stopping = True
    if servicing is not None and servicing.handed_over.is_set():
        log.info("handed over to pid %s; exiting", servicing.successor)


@asynccontextmanager
async def _stop_signals(watchdog: Watchdog | None) -> AsyncIterator[Any]:
    """SIGINT and SIGTERM as an async iterator, watched by ``watchdog`` if there is one."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        if watchdog is None:
            yield signals
        else:
            async with watchdog.watch():
                yield signals


async def run_host(
    registry: Any,
    config: Any,
    *,
    ready: Callable[[Host], None] | None = None,
    cross_cutting: Iterable[object] = (),
    state_file: str | os.PathLike[str] | None = None,
    strict: bool = False,
    notifier: Notifier | None = None,
    takeover: bool = False,
    watchdog: Watchdog | None = None,
) -> int:
    """Serve ``config``'s devices until SIGINT or SIGTERM, then stop them gracefully.

    Before serving: the state file's directory and the control socket (``[host]
    control_socket``) are checked (:class:`ConfigError`), every device is built (a value its
    constructor refuses is one error line naming file, device, key and value). Once started: one
    ``ready:`` line per served device saying where it is reached, a summary (``serving 3 of 5
    devices; failed: ...``), ``ready``, and sd_notify ``READY=1`` when ``NOTIFY_SOCKET`` is set
    (``STOPPING=1`` at the stop). ``strict`` (or ``[host] strict``): any device that cannot be
    built or offered stops the host before it reports ready.

    With ``state_file``: restore from it at start if it exists (:class:`SavedStateError`, naming
    the file, if it cannot be used: nothing is served), and save to it atomically on the stop.
    Temporaries that an interrupted save of it left are removed at start.

    Returns an exit code of :mod:`devicehost.exitcodes`: ``OK`` after a graceful stop with every
    device served, ``FAILED`` if a device failed (at start or since) or the state could not be
    written, ``NOT_STARTED`` if no device could be served or strict mode refused to start. A
    device abandoned while the host stopped (its ``close`` or its ``run`` missed the deadline)
    counts as failed. ``watchdog``: watches the event loop while the host runs
    (:mod:`devicehost.watchdog`); ``devicehost run`` passes one.

    ``takeover``: take every device over, live, from the host running with the same config
    (reached on its ``control_socket``; :mod:`devicehost.takeover`, ``docs/servicing.md``)
    instead of starting them (a state file is then not read); ``NOT_STARTED`` naming the device
    if any cannot be restored (that host rolls back and serves on). A host that is taken over
    returns ``OK`` without saving its state or closing its devices.
    """
    from devicehost import exitcodes
    from devicehost.control import ControlServer
    from devicehost.notify import Notifier
    from devicehost.readiness import announce, failed_devices, summary
    from devicehost.takeover import Servicing, TakeoverClient

    settings = getattr(config, "host", None) or HostSettings()
    strict = strict or settings.strict
    notifier = notifier if notifier is not None else Notifier()
    names = [d.name for d in config.devices]
    if state_file is not None:
        parent = Path(state_file).parent
        if not (parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)):
            # Found now rather than when the state is saved at the stop.
            raise ConfigError(f"{os.fspath(state_file)}: the state file's directory {parent} is"
                              " not a writable directory")
        remove_stale_temporaries(state_file)
    control = None
    client = None
    if takeover:
        if settings.control_socket is None:
            raise ConfigError(f"{getattr(config, 'source', '<config>')}: --takeover needs"
                              " [host] control_socket, where the running host listens")
        client = TakeoverClient(settings.control_socket)
        control = ControlServer(settings.control_socket)
    elif settings.control_socket is not None:
        control = ControlServer(settings.control_socket)
        try:
            control.bind()
        except ConfigError as exc:
            where = f"{getattr(config, 'source', '<config>')}: [host]"
            raise ConfigError(exc.located(where)) from exc
    try:
        saved = None if state_file is None or takeover else read_state_file(state_file)
        if state_file is not None and saved is None and not takeover:
            log.info("no saved state at %s: starting fresh", os.fspath(state_file))
        source = "saved state" if state_file is None else os.fspath(state_file)
        if not names:
            log.warning("nothing to serve: %s has no devices (write [[device]] tables, or"
                        " install device plugins; see devicehost list)",
                        getattr(config, "source", "the config"))
        failed: dict[str, str] = {}
        async with _stop_signals(watchdog) as signals:
            async with open_host(registry, config, cross_cutting=cross_cutting, saved=saved,
                                 saved_source=source, strict=strict, takeover=client) as host:
                if client is not None and control is not None:
                    if client.listener is not None:
                        control.adopt(client.listener)
                    log.info("took over every device from pid %s", client.predecessor)
                    notifier.send(f"MAINPID={os.getpid()}")
                for name, outcome in host.restore_report.items():
                    log.info("restore of %s: %s", name, outcome)
                served = await announce(host, names, log)
                status = summary(host, names)
                if names and served == 0:
                    log.error("%s; no device could be served", status)
                    notifier.status(f"not started: {status}")
                    return exitcodes.NOT_STARTED
                async with anyio.create_task_group() as services:
                    if control is not None:
                        await services.start(control.serve, host)
                        log.info("control socket at %s", control.path)
                        host.servicing = Servicing(control.listener, notifier)
                    log.log(logging.WARNING if served < len(names) else logging.INFO, "%s",
                            status)
                    log.info("ready")
                    notifier.ready(status)
                    if ready is not None:
                        ready(host)
                    await _until_stopped(host, signals)
                    failed = failed_devices(host, names)
                    if host.abandon_devices:  # handed over: the successor serves on
                        assert control is not None
                        control.release()
                        services.cancel_scope.cancel()
                        return exitcodes.OK
                    notifier.stopping("stopping")
                    services.cancel_scope.cancel()
                if state_file is not None:
                    try:
                        write_state_file(state_file, await host.save())
                    except (OSError, DeviceHostError) as exc:
                        log.error("cannot write the saved state to %s: %s", source, exc)
                        return exitcodes.FAILED
                    log.info("saved state written to %s", source)
            # Devices abandoned while the host stopped (a close or a run past its deadline).
            for name, why in host.missed_deadlines().items():
                failed.setdefault(name, why)
    except StartupError as exc:
        log.error("not started: %s", exc)
        notifier.status(f"not started: {exc}")
        return exitcodes.NOT_STARTED
    except HandoffError as exc:
        log.error("takeover failed: %s", exc)
        return exitcodes.NOT_STARTED
    finally:
        if client is not None:
            client.close()
        if control is not None:
            control.close()
    if failed:
        log.error("stopped; %d of %d device(s) failed: %s", len(failed), len(names),
                  ", ".join(failed))
        return exitcodes.FAILED
    log.info("stopped")
    return exitcodes.OK

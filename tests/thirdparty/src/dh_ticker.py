"""A serviceable third-party device: it counts on a Unix socket connection, answers on a listener.

``open`` connects to the Unix socket ``peer`` and listens on ``listen``. ``run`` sends one line
``COUNT PID`` per ``interval`` seconds on the connection (the count continues across a save and a
restore), and answers each connection to the listener with ``COUNT PID`` and closes it.
``close`` sends ``bye PID`` and closes both. ``save_open`` hands both sockets over through
``ctx.fds``; ``restore_open`` takes them back.

Environment knobs for the servicing tests (read when the hook runs):

- ``DH_TICKER_STATE_VERSION`` (at import): the saved-state version this plugin registers.
- ``DH_TICKER_NO_SAVE=1``: ``save_open`` returns None (the device cannot be handed over).
- ``DH_TICKER_FAIL_RESTORE=1``: ``restore_open`` raises.
- ``DH_TICKER_FAIL_BUILD=1``: the constructor raises.
- ``DH_TICKER_HANG_SAVE=1``: ``save_open`` sends ``saving PID`` and sleeps for an hour.
- ``DH_TICKER_RESTORE_GATE=PATH``: ``restore_open`` sends ``restoring PID`` on the handed-over
  connection, then waits until PATH exists.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import time
from typing import Any

import anyio
import attrs

from devicehost import DeviceContext, LocalOffer, hookimpl, saved_state


@attrs.frozen
class TickerConfig:
    peer: pathlib.Path | None = None
    listen: pathlib.Path | None = None
    interval: float = 0.005


@saved_state("dh_ticker.State", int(os.environ.get("DH_TICKER_STATE_VERSION", "1")))
@attrs.frozen
class TickerState:
    count: int
    connection: int
    listener: int


@attrs.define
class Runner:
    connection: socket.socket
    listener: socket.socket
    count: int = 0


def _line(sock: socket.socket, text: str) -> None:
    sock.setblocking(True)
    sock.sendall(f"{text}\n".encode())


class TickerDevice:
    config_class = TickerConfig

    def __init__(self, config: TickerConfig) -> None:
        if os.environ.get("DH_TICKER_FAIL_BUILD"):
            raise RuntimeError("DH_TICKER_FAIL_BUILD is set")
        self.config = config

    @hookimpl
    def offer(self, ctx: DeviceContext) -> LocalOffer:
        return LocalOffer({"peer": str(self.config.peer), "listen": str(self.config.listen)})

    @hookimpl
    def open(self, ctx: DeviceContext, resources: LocalOffer) -> Runner:
        if self.config.peer is None or self.config.listen is None:
            raise ValueError("peer and listen must be set")
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.connect(str(self.config.peer))
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.config.listen))
        listener.listen(8)
        return Runner(connection, listener)

    @hookimpl
    def run(self, ctx: DeviceContext, runner: Runner) -> Any:
        return self._run(runner)

    async def _run(self, runner: Runner) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._answer, runner)
            while True:
                runner.count += 1
                _line(runner.connection, f"{runner.count} {os.getpid()}")
                await anyio.sleep(self.config.interval)

    async def _answer(self, runner: Runner) -> None:
        runner.listener.setblocking(False)
        while True:
            await anyio.wait_readable(runner.listener)
            try:
                conn, _ = runner.listener.accept()
            except BlockingIOError:
                continue
            with conn:
                _line(conn, f"{runner.count} {os.getpid()}")

    @hookimpl
    def save_open(self, ctx: DeviceContext, runner: Runner) -> TickerState | None:
        if os.environ.get("DH_TICKER_NO_SAVE"):
            return None
        if os.environ.get("DH_TICKER_HANG_SAVE"):
            _line(runner.connection, f"saving {os.getpid()}")
            time.sleep(3600)
        return TickerState(runner.count, ctx.fds.put(runner.connection),
                           ctx.fds.put(runner.listener))

    @hookimpl
    def restore_open(self, ctx: DeviceContext, state: TickerState, resources: Any) -> Runner:
        if os.environ.get("DH_TICKER_FAIL_RESTORE"):
            raise RuntimeError("DH_TICKER_FAIL_RESTORE is set")
        runner = Runner(ctx.fds.take_socket(state.connection),
                        ctx.fds.take_socket(state.listener), state.count)
        gate = os.environ.get("DH_TICKER_RESTORE_GATE")
        if gate:
            _line(runner.connection, f"restoring {os.getpid()}")
            deadline = time.monotonic() + 60
            while not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.01)
        return runner

    @hookimpl
    def close(self, ctx: DeviceContext, runner: Runner) -> None:
        with contextlib.suppress(OSError):
            _line(runner.connection, f"bye {os.getpid()}")
        runner.connection.close()
        runner.listener.close()
        if self.config.listen is not None:
            os.unlink(self.config.listen)

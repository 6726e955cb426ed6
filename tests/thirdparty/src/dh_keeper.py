"""A third-party device that keeps a socket across a save and restore through ``ctx.fds``: its
runner holds one end of a socketpair; ``save_open`` declares it (``ctx.fds.put``) and
``restore_open`` takes it back. ``inspect`` says which process runs it and the socket's inode."""

from __future__ import annotations

import os
import socket
from typing import Any

import anyio
import attrs

from devicehost import DeviceContext, LocalOffer, hookimpl, saved_state


@saved_state("dh_keeper.State", 1)
@attrs.frozen
class KeeperState:
    handle: int
    token: str


class KeeperDevice:
    def __init__(self, config: None) -> None:
        pass

    @hookimpl
    def offer(self, ctx: DeviceContext) -> LocalOffer:
        return LocalOffer()

    @hookimpl
    def open(self, ctx: DeviceContext, resources: LocalOffer) -> dict[str, Any]:
        mine, other = socket.socketpair()
        return {"sock": mine, "other": other, "token": os.urandom(4).hex()}

    @hookimpl
    def run(self, ctx: DeviceContext, runner: dict[str, Any]) -> Any:
        return anyio.sleep_forever()

    @hookimpl
    def save_open(self, ctx: DeviceContext, runner: dict[str, Any]) -> KeeperState:
        return KeeperState(ctx.fds.put(runner["sock"]), runner["token"])

    @hookimpl
    def restore_open(self, ctx: DeviceContext, state: KeeperState, resources: LocalOffer
                     ) -> dict[str, Any]:
        return {"sock": ctx.fds.take_socket(state.handle), "other": None, "token": state.token}

    @hookimpl
    def inspect(self, ctx: DeviceContext, runner: dict[str, Any] | None) -> dict[str, Any]:
        if runner is None:
            return {"pid": os.getpid()}
        return {"pid": os.getpid(), "inode": os.fstat(runner["sock"].fileno()).st_ino,
                "token": runner["token"]}

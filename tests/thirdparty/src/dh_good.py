"""A well-behaved third-party device: it journals its lifecycle to the file its config names."""

from __future__ import annotations

import pathlib
from typing import Any

import anyio
import attrs

from devicehost import DeviceContext, LocalOffer, hookimpl


@attrs.frozen
class GoodConfig:
    journal: pathlib.Path | None = None
    greeting: str = "hello"


class GoodDevice:
    config_class = GoodConfig

    def __init__(self, config: GoodConfig | None) -> None:
        self.config = config or GoodConfig()

    def _journal(self, event: str) -> None:
        if self.config.journal is not None:
            with self.config.journal.open("a") as f:
                f.write(event + "\n")

    @hookimpl
    def offer(self, ctx: DeviceContext) -> LocalOffer:
        self._journal(f"offer {ctx.name}")
        return LocalOffer({"greeting": self.config.greeting})

    @hookimpl
    def open(self, ctx: DeviceContext, resources: LocalOffer) -> dict[str, Any]:
        self._journal("open")
        return {"greeting": resources.description["greeting"]}

    @hookimpl
    def run(self, ctx: DeviceContext, runner: dict[str, Any]) -> Any:
        return self._run(runner)

    async def _run(self, runner: dict[str, Any]) -> None:
        self._journal(f"run {runner['greeting']}")
        await anyio.sleep_forever()

    @hookimpl
    def close(self, ctx: DeviceContext, runner: dict[str, Any]) -> None:
        self._journal("close")

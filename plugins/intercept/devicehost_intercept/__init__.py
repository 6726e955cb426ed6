"""devicehost-intercept (package skeleton: the device lands with its own issue)."""

from __future__ import annotations

from typing import Any

from devicehost import DeviceContext, LocalOffer, hookimpl

__all__ = ["InterceptRelay"]


class InterceptRelay:
    """Skeleton device: offers nothing on a bus yet."""

    def __init__(self, config: Any = None) -> None:
        self.config = config

    @hookimpl
    def offer(self, ctx: DeviceContext) -> LocalOffer:
        return LocalOffer({"skeleton": True})

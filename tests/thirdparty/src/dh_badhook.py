"""A third-party device whose ``open`` hookimpl asks for an argument the spec does not have."""

from typing import Any

from devicehost import LocalOffer, hookimpl


class BadHookDevice:
    def __init__(self, config: Any) -> None:
        self.config = config

    @hookimpl
    def offer(self, ctx: Any) -> LocalOffer:
        return LocalOffer()

    @hookimpl
    def open(self, ctx: Any, resources: Any, flavour: str) -> object:
        return object()

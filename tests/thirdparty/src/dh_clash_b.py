"""One of two third-party distributions that claim the device name 'clash'."""

from typing import Any

from devicehost import LocalOffer, hookimpl


class ClashDevice:
    def __init__(self, config: Any) -> None:
        self.config = config

    @hookimpl
    def offer(self, ctx: Any) -> LocalOffer:
        return LocalOffer({"from": "dh_clash_b"})

"""The guest stack of the ``guest`` fixture: a :class:`GuestStack` on the in-process virtio
driver of a vsock device served by a real host, which it keeps for the tests to inspect."""

from __future__ import annotations

from devicehost.host import Host
from devicehost.virtio import VirtioDriver
from devicehost_vsock.guest_stack import GuestStack

__all__ = ["HostedGuest"]


class HostedGuest(GuestStack):
    """A guest stack that knows its driver is a :class:`VirtioDriver` (config space readable)
    and the host serving the device (``host.devices["vsock"]`` is the device)."""

    driver: VirtioDriver

    def __init__(self, driver: VirtioDriver, host: Host, *, cid: int, buf_alloc: int) -> None:
        super().__init__(driver, cid=cid, buf_alloc=buf_alloc)
        self.driver = driver
        self.host = host

"""The devicehost pytest plugin (entry point ``pytest11``): fixtures for device authors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from devicehost.testing.registry import host_with

__all__ = ["devicehost_host", "devicehost_vmbus_socket_guest"]


@pytest.fixture
def devicehost_host() -> Callable[..., Any]:
    """A factory for hosts serving device classes given directly (nothing installed).

    Use it as ``async with devicehost_host({"echo": EchoDevice}) as host: ...``.
    """
    return host_with


@pytest.fixture
def devicehost_vmbus_socket_guest() -> Callable[..., Any]:
    """A factory for a host serving its VMBus on a socket, with a socket guest connected
    (:func:`devicehost.testing.vmbus.socket_guest_session`).

    Use it as ``async with devicehost_vmbus_socket_guest({"vmbfs": VmbfsDevice}) as session:``
    and drive ``session.client`` (a :class:`devicehost.vmbus.socketclient.SocketVmbusClient`).
    """
    from devicehost.testing.vmbus import socket_guest_session

    return socket_guest_session

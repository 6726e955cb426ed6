"""devicehost-intercept: devices that are VMBus clients of an offered channel.

A re-implementation of OpenVMM's ``vmbus_relay_intercept_device``: a client device claims an
instance id; the relay routes the host VMBus client's offers of that instance to the device's
wrapper, which allocates ring memory, creates the GPADL, opens the channel and runs the device's
client-side runner over it (facts §10). The ``intercept`` device is the relay as operators see
it: stopping it stops (closes) every intercepted channel, starting it reopens them.
"""

from __future__ import annotations

from devicehost_intercept.device import InterceptConfig, InterceptRelay, RelayRunner
from devicehost_intercept.relay import ChannelRelay
from devicehost_intercept.state import InterceptedChannel, RelaySavedState
from devicehost_intercept.transport import InterceptTransport
from devicehost_intercept.wrapper import InterceptWrapper

__all__ = [
    "ChannelRelay",
    "InterceptConfig",
    "InterceptRelay",
    "InterceptTransport",
    "InterceptWrapper",
    "InterceptedChannel",
    "RelayRunner",
    "RelaySavedState",
]

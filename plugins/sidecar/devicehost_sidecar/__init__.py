"""devicehost-sidecar: a client for the OpenHCL sidecar kernel's per-node character devices, and a
simulated sidecar kernel with the same page layout and completion protocol.

The device type is :class:`SidecarDevice` (entry point ``sidecar``); its runner is a
:class:`SidecarClient`, reached through the host as ``host.devices[name].runner``.
"""

from __future__ import annotations

from devicehost_sidecar.client import (
    RunHandle,
    RunNotWaitedWarning,
    SidecarClient,
    SidecarVp,
    VpState,
)
from devicehost_sidecar.device import SidecarConfig, SidecarDevice
from devicehost_sidecar.errors import (
    HypervisorError,
    RunNotWaitedError,
    SidecarClientError,
    SidecarDriverError,
    SidecarError,
    SidecarProtocolError,
    SidecarUnavailableError,
    SidecarUsageError,
)
from devicehost_sidecar.hvdef import (
    HvMessage,
    HvX64RegisterName,
)
from devicehost_sidecar.kernel import KernelDriver
from devicehost_sidecar.protocol import (
    MAX_GET_SET_VP_REGISTERS,
    RegisterAssoc,
    TranslateGvaResponse,
)
from devicehost_sidecar.simulator import SimulatedSidecar, VpScript

__all__ = [
    "MAX_GET_SET_VP_REGISTERS",
    "HvMessage",
    "HvX64RegisterName",
    "HypervisorError",
    "KernelDriver",
    "RegisterAssoc",
    "RunHandle",
    "RunNotWaitedError",
    "RunNotWaitedWarning",
    "SidecarClient",
    "SidecarClientError",
    "SidecarConfig",
    "SidecarDevice",
    "SidecarDriverError",
    "SidecarError",
    "SidecarProtocolError",
    "SidecarUnavailableError",
    "SidecarUsageError",
    "SidecarVp",
    "SimulatedSidecar",
    "TranslateGvaResponse",
    "VpScript",
    "VpState",
]

"""devicehost-vsock: the virtio-vsock device, relaying guest stream sockets to host Unix sockets.

Guest connections to port P reach the host Unix socket ``<base_path>_<P>``; host processes reach
guest port P by connecting to ``<base_path>`` and writing ``CONNECT <P>\\n`` (hybrid vsock).
"""

from __future__ import annotations

from devicehost_vsock.device import VsockConfig, VsockDevice, VsockRunner

__all__ = ["VsockConfig", "VsockDevice", "VsockRunner"]

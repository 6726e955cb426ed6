"""The sidecar client's error vocabulary. Each error says who is to blame.

- :class:`SidecarError`: the sidecar kernel ran a command and reported that it failed; the message
  carries the kernel's own text.
- :class:`HypervisorError`: the command ran, but the hypervisor answered with a non-zero HvStatus.
- :class:`SidecarProtocolError`: the sidecar kernel (or the simulator standing in for it) broke the
  protocol: a completion record of the wrong size, a completion for a CPU that was never started,
  a response that does not fit its page, an info struct that makes no sense. This is the one error
  type of the untrusted boundary between this process and the sidecar kernel.
- :class:`SidecarDriverError`: the operating system refused us: a node device could not be opened,
  an ioctl or mmap failed. Wraps the ``OSError``.
- :class:`SidecarUsageError`: the caller misused the client: an unknown CPU, a CPU already in use,
  a run handle never waited for, a closed client.
"""

from __future__ import annotations

__all__ = [
    "HypervisorError",
    "RunNotWaitedError",
    "SidecarClientError",
    "SidecarDriverError",
    "SidecarError",
    "SidecarProtocolError",
    "SidecarUnavailableError",
    "SidecarUsageError",
]


class SidecarClientError(Exception):
    """Base class of every error the sidecar plugin raises on purpose."""


class SidecarError(SidecarClientError):
    """Raised when the sidecar kernel reports a failed command (``has_error``); ``text`` is the
    kernel's own message, decoded as lossy UTF-8."""

    def __init__(self, text: str, *, cpu: int | None = None, command: str | None = None) -> None:
        self.text = text
        self.cpu = cpu
        self.command = command
        super().__init__(f"sidecar error: {text}")


class HypervisorError(SidecarClientError):
    """Raised when a command's output carries an HvStatus other than success."""

    def __init__(self, status: int, *, cpu: int, command: str) -> None:
        from devicehost_sidecar.hvdef import hv_status_name  # hvdef imports this module

        self.status = status
        self.cpu = cpu
        self.command = command
        super().__init__(
            f"hypervisor error {status:#06x} ({hv_status_name(status)}) in {command} on CPU {cpu}"
        )


class SidecarProtocolError(SidecarClientError):
    """Raised when data from the sidecar kernel (command page, completion fd, info ioctl) breaks
    the protocol. The sidecar kernel is to blame; the host carries on."""


class SidecarDriverError(SidecarClientError):
    """Raised when the operating system refuses an open, ioctl or mmap of a sidecar node, or
    waiting on or reading its completion fd; the message names the node."""


class SidecarUnavailableError(SidecarDriverError):
    """Raised when the kernel driver is configured but this machine has no sidecar (node 0 is
    missing)."""


class SidecarUsageError(SidecarClientError):
    """Raised when the caller misuses the client (unknown CPU, CPU in use, closed client)."""


class RunNotWaitedError(SidecarUsageError):
    """Raised when a run handle is left without ``wait`` having been called on it."""

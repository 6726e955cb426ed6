"""systemd's readiness protocol (``sd_notify``), spoken directly over its socket.

When a service runs with ``Type=notify``, systemd sets ``NOTIFY_SOCKET`` to the address of an
``AF_UNIX`` datagram socket; the service sends newline-separated ``KEY=VALUE`` assignments to it,
one datagram per message: ``READY=1`` once it serves, ``STOPPING=1`` when it begins to stop,
``STATUS=...`` a one-line status shown by ``systemctl status``. An address starting with ``@`` is
in the abstract namespace (the ``@`` stands for a leading NUL byte). See sd_notify(3).

:class:`Notifier` is what ``devicehost run`` uses. Without ``NOTIFY_SOCKET`` it does nothing.
Notification is best effort, as in libsystemd: a send that fails is logged once and never fails
the host. The socket is non-blocking, so a full or vanished receiver cannot stall the host.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import Final

__all__ = ["NOTIFY_SOCKET", "Notifier", "notify_address"]

#: The environment variable naming the service manager's notification socket.
NOTIFY_SOCKET: Final = "NOTIFY_SOCKET"
#: The longest ``sun_path`` Linux accepts (108 bytes, NUL included for a path).
_MAX_ADDRESS: Final = 107
_MAX_STATUS: Final = 200

log = logging.getLogger("devicehost.notify")


def notify_address(value: str) -> str | bytes:
    """The socket address for a ``NOTIFY_SOCKET`` value: an absolute path, or ``@name`` for the
    abstract namespace (returned as bytes with a leading NUL). ValueError for anything else."""
    if value.startswith("@") and len(value) > 1:
        address = b"\0" + value[1:].encode()
        if len(address) > _MAX_ADDRESS + 1:
            raise ValueError(f"{NOTIFY_SOCKET} {value!r} is too long for a Unix socket address")
        return address
    if value.startswith("/"):
        if len(value.encode()) > _MAX_ADDRESS or "\0" in value:
            raise ValueError(f"{NOTIFY_SOCKET} {value!r} is not a usable socket path")
        return value
    raise ValueError(f"{NOTIFY_SOCKET} {value!r} is neither an absolute path nor an @abstract name")


class Notifier:
    """Sends sd_notify messages to ``NOTIFY_SOCKET`` (from ``environ``, default ``os.environ``)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        value = env.get(NOTIFY_SOCKET, "")
        self._value = value
        self._address: str | bytes | None = None
        self._failed = False
        if value:
            try:
                self._address = notify_address(value)
            except ValueError as exc:
                log.warning("not notifying the service manager: %s", exc)

    @property
    def enabled(self) -> bool:
        """True if a service manager asked to be notified."""
        return self._address is not None

    def ready(self, status: str) -> bool:
        """Tell the service manager the host serves: ``READY=1`` and ``STATUS=status``."""
        return self.send(f"READY=1\nSTATUS={_one_line(status)}")

    def stopping(self, status: str) -> bool:
        """Tell the service manager the host is stopping: ``STOPPING=1`` and ``STATUS=status``."""
        return self.send(f"STOPPING=1\nSTATUS={_one_line(status)}")

    def status(self, status: str) -> bool:
        """Update the one-line status only."""
        return self.send(f"STATUS={_one_line(status)}")

    def send(self, message: str) -> bool:
        """Send one datagram; True if it was sent, False without a socket or on an error."""
        if self._address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(message.encode(), self._address)
        except OSError as exc:
            if not self._failed:
                log.warning("cannot notify the service manager at %s: %s", self._value, exc)
            self._failed = True
            return False
        return True


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _MAX_STATUS else line[: _MAX_STATUS - 3] + "..."

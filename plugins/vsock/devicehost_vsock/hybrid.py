"""The hybrid vsock Unix protocol: the ``CONNECT``/``OK`` line exchange and the host path names.

A host process reaches a guest port by connecting to the device's Unix listener and writing one
line, ``CONNECT <port>\\n`` or ``CONNECT <guid>\\n``; once the guest accepts, the device answers
``OK <local port>\\n`` in the form the request used (facts section 9.9). A guest reaching host port
P is relayed to the Unix socket ``<base_path>_<P>``, falling back to ``<base_path>_<guid of P>``.
SEQPACKET connections use the same names with ``SOCK_SEQPACKET`` sockets: a guest SEQPACKET
connection needs a SEQPACKET listener there, and a host reaches a guest SEQPACKET port through the
device's SEQPACKET listener at ``<base_path>_seqpacket``, sending the CONNECT line as its first
message and getting ``OK`` as the first message back.

Port <-> GUID: the vsock template GUID ``00000000-facb-11e6-bd58-64006a7986d3`` with data1 = port.

Rules as decided here:

- The ``CONNECT `` prefix is matched case-insensitively; the port is a decimal u32 with an optional
  leading ``+`` and nothing else (no spaces, no ``\\r``); a GUID is 36 characters, or 38 wrapped in
  braces, with hyphens at 8/13/18/23, hex digits in either case. A GUID that is not the vsock
  template parses (lowercased) but names no port, so the device refuses it.
- The line, ``\\n`` included, is at most 45 bytes (:data:`CONNECT_LINE_MAX`), so the braced GUID
  form (47 bytes) is refused by length although the GUID parser accepts it.
- **[AMBIGUOUS]** upstream swallows bytes that follow the ``\\n`` in the same read; the relay
  here consumes the socket only up to and including the ``\\n`` (it peeks first), so early data
  is relayed, not lost.
"""

from __future__ import annotations

import os
import re
from typing import Final

import attrs

__all__ = [
    "CONNECT_LINE_MAX",
    "TEMPLATE_GUID",
    "ConnectLineError",
    "ConnectRequest",
    "decode_connect_untrusted",
    "encode_ok",
    "guid_for_port",
    "host_listener_path",
    "listener_candidates",
    "seqpacket_listener_path",
]

#: Length of ``"CONNECT 00000000-facb-11e6-bd58-64006a7986d3\n"``: the longest accepted line.
CONNECT_LINE_MAX: Final = 45
#: The vsock service template; data1 (the first 8 hex digits) carries the port.
TEMPLATE_GUID: Final = "00000000-facb-11e6-bd58-64006a7986d3"

_PREFIX: Final = b"connect "
_PORT_RE: Final = re.compile(rb"\+?[0-9]+")
_GUID_RE: Final = re.compile(
    rb"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
_TEMPLATE_TAIL: Final = TEMPLATE_GUID[8:]


class ConnectLineError(Exception):
    """Raised when a host peer's CONNECT line is malformed or too long (the host peer's fault)."""


@attrs.frozen
class ConnectRequest:
    """A parsed CONNECT line: ``guid`` is set (lowercase) when the GUID form was used; ``port`` is
    ``None`` for a GUID that is not the vsock template."""

    port: int | None
    guid: str | None = None


def guid_for_port(port: int) -> str:
    """The vsock template GUID with data1 = ``port``, lowercase."""
    return f"{port & 0xFFFFFFFF:08x}{_TEMPLATE_TAIL}"


def decode_connect_untrusted(line: bytes | bytearray | memoryview) -> ConnectRequest:
    """Parse one complete CONNECT line, ``\\n`` included; raises :class:`ConnectLineError`."""
    raw = bytes(line)
    if len(raw) > CONNECT_LINE_MAX:
        raise ConnectLineError(
            f"host peer sent a CONNECT line of {len(raw)} bytes (limit {CONNECT_LINE_MAX})"
        )
    if not raw.endswith(b"\n"):
        raise ConnectLineError("host peer's CONNECT line does not end with a newline")
    body = raw[:-1]
    if body[: len(_PREFIX)].lower() != _PREFIX:
        raise ConnectLineError(f"host peer sent {raw[:16]!r}..., expected 'CONNECT <port>'")
    arg = body[len(_PREFIX) :]
    if _PORT_RE.fullmatch(arg):
        port = int(arg)
        if port > 0xFFFFFFFF:
            raise ConnectLineError(f"host peer asked for port {port}, which exceeds 32 bits")
        return ConnectRequest(port=port)
    if len(arg) == 38 and arg[:1] == b"{" and arg[-1:] == b"}":
        arg = arg[1:-1]
    if len(arg) == 36 and _GUID_RE.fullmatch(arg):
        guid = arg.decode("ascii").lower()
        port_of_guid = int(guid[:8], 16) if guid[8:] == _TEMPLATE_TAIL else None
        return ConnectRequest(port=port_of_guid, guid=guid)
    raise ConnectLineError(f"host peer named {arg[:40]!r}, which is neither a port nor a GUID")


def encode_ok(local_port: int, request: ConnectRequest) -> bytes:
    """The ``OK`` reply carrying the device's local port, in the form ``request`` used."""
    if request.guid is not None:
        return f"OK {guid_for_port(local_port)}\n".encode("ascii")
    return f"OK {local_port}\n".encode("ascii")


def listener_candidates(base_path: str, port: int) -> tuple[str, str]:
    """The two host paths a guest connection to ``port`` may reach, in the order tried."""
    return f"{base_path}_{port}", f"{base_path}_{guid_for_port(port)}"


def seqpacket_listener_path(base_path: str) -> str:
    """The device's ``SOCK_SEQPACKET`` listener for host-initiated SEQPACKET connections (a Unix
    listener has one socket kind, so the stream listener at ``base_path`` cannot take them);
    the name cannot clash with ``<base_path>_<port>`` or ``<base_path>_<guid>``."""
    return f"{base_path}_seqpacket"


def host_listener_path(base_path: str, port: int) -> str:
    """The host Unix socket path for guest port ``port``; raises :class:`FileNotFoundError`
    ("no hybrid vsock listener") when neither candidate exists."""
    for path in listener_candidates(base_path, port):
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"no hybrid vsock listener for port {port} at {base_path}_<port>")

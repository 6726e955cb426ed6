"""What a live vhost-user session carries to a new process in a takeover (``docs/servicing.md``).

When the host saves for a handoff, each :class:`~devicehost.virtio.vhost_user.VhostUserBackend`
parks its connection loop at a **safe point** and saves one :class:`VhostUserHandover`: the
device's envelope entry. The safe point is either *between two messages* (nothing of the next
one read) or *one complete message held at the host's guest gate*, unapplied: that message
(:class:`PendingMessage`, its bytes and its descriptors) travels with the state and the new
process applies it first. Never half a message: a message whose first byte arrived is read to
its end (within the message deadline) before the loop parks.

What travels (descriptors through the device's ``ctx.fds`` stash, as handles in the state):

- the vhost-user **listening socket** (so a VMM that reconnects later finds the new process at
  the same path) and the **VMM connection** (None when no VMM is connected), and whether the
  connection's first message is still due (``handshake``);
- the negotiated virtio and protocol **features** and the **owner** flag;
- the **memory table**: per region its guest address, size, the VMM's virtual address (what
  SET_VRING_ADDR is translated through) and mmap offset, and its memfd;
- per **vring**: size, the guest addresses of its three parts, base, enabled, started, and its
  kick, call and error eventfds; while the device is open, the queue's position
  (:class:`HandedQueue`: last avail index, used index, and the chains popped but not returned,
  which the new process's queue replays once, see :mod:`devicehost.virtio.queue`);
- whether the **device** was open and running, and the value its ``save_open`` returned
  (``device_type``/``device_version``/``device_payload``: an envelope entry of its own, decoded
  by the plugin's registered saved-state type in the new process);
- the **pending message**, if the loop was parked holding one.

Everything decoded here is untrusted (it comes from another process over the control socket):
:func:`check_handover_untrusted` bounds every count, size and index (vrings exactly the device's
queue count, at most :data:`~devicehost.virtio.vhost_message.MAX_MEM_REGIONS` regions that do
not overlap, ring parts aligned and inside the memory table, queue indices 16-bit, chains in
flight distinct heads below the vring size, features within what is offered, descriptor handles
distinct) and raises only :class:`VhostHandoverError` (a
:class:`~devicehost.errors.SavedStateError`), blaming the process that sent the state.
:func:`decode_vhost_handover_untrusted` is the JSON payload's decoder with those checks.
"""

from __future__ import annotations

import itertools
import json
from typing import Any, Final

import attrs

from devicehost.errors import SavedStateError
from devicehost.savedstate import (
    SavedEntry,
    decode_state_untrusted,
    encode_state,
    saved_state,
)
from devicehost.virtio.queue import MAX_QUEUE_SIZE
from devicehost.virtio.traits import DeviceTraits, offered_features
from devicehost.virtio.vhost_message import (
    MAX_MEM_REGIONS,
    MAX_PAYLOAD,
    USER_F_PROTOCOL_FEATURES,
)

__all__ = [
    "HANDOVER_TYPE",
    "HandedQueue",
    "HandedRegion",
    "HandedVring",
    "PendingMessage",
    "VhostHandoverError",
    "VhostUserHandover",
    "check_handover_untrusted",
    "decode_device_state_untrusted",
    "decode_vhost_handover_untrusted",
    "encode_vhost_handover",
]

#: The saved-state type name of a handed-over vhost-user session.
HANDOVER_TYPE: Final = "virtio.VhostUserHandover"
_U16: Final = 0xFFFF
_U32: Final = 0xFFFF_FFFF
_U64: Final = (1 << 64) - 1
#: Descriptors one pending message may carry (vhost-user's own limit).
_MAX_PENDING_FDS: Final = MAX_MEM_REGIONS
#: The kinds of descriptors a pending message may carry across (what some message uses); a
#: descriptor of another kind is dropped at the save (the message is refused either way).
_MESSAGE_FD_KINDS: Final = frozenset({"eventfd", "memfd", "regular"})


class VhostHandoverError(SavedStateError):
    """Raised when a handed-over vhost-user session is inconsistent or out of bounds (the
    process that sent it is to blame)."""


@attrs.frozen
class HandedRegion:
    """One region of the memory table; ``fd`` is its file's handle in the device's stash and
    ``kind`` that file's kind (``memfd``, or ``regular`` where unsealed memory is allowed)."""

    gpa: int
    size: int
    user_addr: int
    mmap_offset: int
    fd: int
    kind: str


@attrs.frozen
class HandedQueue:
    """Where the open device was in one queue: what :class:`~devicehost.virtio.QueueState`
    holds."""

    last_avail_idx: int
    used_idx: int
    inflight: tuple[int, ...]


@attrs.frozen
class HandedVring:
    """One vring as the session knew it; ``kick``/``call``/``err`` are eventfd handles (None:
    none set); ``queue`` is set while the device was open."""

    num: int
    desc: int | None
    avail: int | None
    used: int | None
    base: int
    enabled: bool
    started: bool
    kick: int | None
    call: int | None
    err: int | None
    queue: HandedQueue | None


@attrs.frozen
class PendingMessage:
    """A complete front-end message that waited at the guest gate, unapplied; ``fds`` are
    (handle, kind) of the descriptors it carried."""

    request: int
    flags: int
    payload: bytes
    fds: tuple[tuple[int, str], ...]


@saved_state(HANDOVER_TYPE, 1)
@attrs.frozen
class VhostUserHandover:
    """A vhost-user session handed to a new process (module docstring)."""

    listener: int
    connection: int | None
    handshake: bool
    features: int
    protocol_features: int
    owner: bool
    regions: tuple[HandedRegion, ...]
    vrings: tuple[HandedVring, ...]
    device_open: bool
    device_running: bool
    device_type: str
    device_version: int
    device_payload: bytes
    pending: PendingMessage | None


def encode_vhost_handover(state: VhostUserHandover) -> dict[str, Any]:
    """The JSON payload of ``state`` (what its envelope entry holds)."""
    return encode_state(state)


def decode_vhost_handover_untrusted(
    payload: Any, traits: DeviceTraits, protocol_features: int
) -> VhostUserHandover:
    """Decode and check a handed-over session's payload for a device of ``traits`` whose
    backend offers ``protocol_features``; :class:`VhostHandoverError` only."""
    entry = SavedEntry("vhost-user", "vhost-user", HANDOVER_TYPE, 1, payload)
    try:
        state: VhostUserHandover = decode_state_untrusted(entry, VhostUserHandover)
    except VhostHandoverError:
        raise
    except SavedStateError as exc:
        raise VhostHandoverError(str(exc)) from None
    check_handover_untrusted(state, traits, protocol_features)
    return state


def decode_device_state_untrusted(state: VhostUserHandover, device: str, plugin: str) -> Any:
    """The device's own saved state inside ``state`` (None when the device was not open),
    decoded by its registered type; :class:`SavedStateError` naming ``device``."""
    if not state.device_open:
        return None
    try:
        payload = json.loads(state.device_payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise VhostHandoverError(f"device {device!r}: its handed-over state is not JSON") from exc
    if not isinstance(payload, dict):
        raise VhostHandoverError(f"device {device!r}: its handed-over state is not an object")
    return decode_state_untrusted(
        SavedEntry(device, plugin, state.device_type, state.device_version, payload))


def _fail(message: str) -> VhostHandoverError:
    return VhostHandoverError(f"the handed-over vhost-user session: {message}")


def check_handover_untrusted(
    state: VhostUserHandover, traits: DeviceTraits, protocol_features: int
) -> None:
    """Check every bound of ``state`` (module docstring); :class:`VhostHandoverError`."""
    offered = offered_features(traits) | 1 << USER_F_PROTOCOL_FEATURES
    if not 0 <= state.features <= _U64 or state.features & ~offered:
        raise _fail(f"features {state.features:#x} were never offered ({offered:#x})")
    if not 0 <= state.protocol_features <= _U64 or state.protocol_features & ~protocol_features:
        raise _fail(f"protocol features {state.protocol_features:#x} were never offered")
    handles: list[int] = [state.listener]
    if state.connection is not None:
        handles.append(state.connection)
    elif state.pending is not None or state.regions or state.device_open:
        raise _fail("a session without a connection holds a message, memory or an open device")
    if len(state.regions) > MAX_MEM_REGIONS:
        raise _fail(f"{len(state.regions)} memory regions (at most {MAX_MEM_REGIONS})")
    spans: list[tuple[int, int]] = []
    for i, r in enumerate(state.regions):
        if not (0 < r.size <= _U64 and 0 <= r.gpa <= _U64 - r.size
                and 0 <= r.user_addr <= _U64 - r.size and 0 <= r.mmap_offset <= _U64 - r.size):
            raise _fail(f"memory region {i} is out of range")
        if r.kind not in ("memfd", "regular"):
            raise _fail(f"memory region {i} is backed by a {r.kind[:32]!r}")
        spans.append((r.gpa, r.gpa + r.size))
        handles.append(r.fd)
    spans.sort()
    for (_, end), (start, _) in itertools.pairwise(spans):
        if start < end:
            raise _fail("memory regions overlap")
    if len(state.vrings) != traits.queue_count:
        raise _fail(f"{len(state.vrings)} vrings; the device has {traits.queue_count}")
    limit = min(MAX_QUEUE_SIZE, traits.max_queue_size)
    for i, v in enumerate(state.vrings):
        _check_vring(i, v, limit, state)
        handles += [h for h in (v.kick, v.call, v.err) if h is not None]
    if state.device_open:
        if not state.regions or any(v.queue is None or not v.started for v in state.vrings):
            raise _fail("the device is open but a vring is not started or has no queue state")
        if not state.device_type or not 0 < state.device_version <= _U32:
            raise _fail("the device is open but its saved state has no type")
    elif state.device_running or any(v.queue is not None for v in state.vrings):
        raise _fail("a closed device is running or has queue state")
    if state.pending is not None:
        p = state.pending
        if not (0 <= p.request <= _U32 and 0 <= p.flags <= _U32):
            raise _fail("the pending message's header is out of range")
        if len(p.payload) > MAX_PAYLOAD or len(p.fds) > _MAX_PENDING_FDS:
            raise _fail(f"the pending message has {len(p.payload)} bytes and {len(p.fds)}"
                        " descriptors")
        if any(kind not in _MESSAGE_FD_KINDS for _, kind in p.fds):
            raise _fail("the pending message carries a descriptor of a kind no message uses")
        handles += [h for h, _ in p.fds]
    if any(not 0 <= h <= _U32 for h in handles) or len(set(handles)) != len(handles):
        raise _fail("descriptor handles are out of range or repeated")


def _check_vring(i: int, v: HandedVring, limit: int, state: VhostUserHandover) -> None:
    if v.num and (not 1 <= v.num <= limit or v.num & (v.num - 1)):
        raise _fail(f"vring {i} size {v.num} is not a power of two up to {limit}")
    if not 0 <= v.base <= _U16:
        raise _fail(f"vring {i} base {v.base} is not a 16-bit index")
    parts = (v.desc, v.avail, v.used)
    if any(p is not None for p in parts):
        if any(p is None for p in parts) or not v.num:
            raise _fail(f"vring {i} has some ring addresses but not all, or no size")
        desc, avail, used = parts
        assert desc is not None and avail is not None and used is not None
        if desc % 16 or avail % 2 or used % 4:
            raise _fail(f"vring {i} parts are misaligned")
        if any(not 0 <= p <= _U64 for p in (desc, avail, used)):
            raise _fail(f"vring {i} ring addresses are out of range")
        # Whether the rings lie inside guest memory is checked where the queues are built
        # (a later memory table may legitimately have left them outside while not started).
    if v.started and v.kick is None:
        raise _fail(f"vring {i} is started without a kick eventfd")
    q = v.queue
    if q is not None:
        if v.desc is None:
            raise _fail(f"vring {i} has queue state but no rings")
        if not (0 <= q.last_avail_idx <= _U16 and 0 <= q.used_idx <= _U16):
            raise _fail(f"vring {i} queue indices are not 16-bit")
        if (len(q.inflight) > v.num or len(set(q.inflight)) != len(q.inflight)
                or any(not 0 <= h < v.num for h in q.inflight)):
            raise _fail(f"vring {i} chains in flight are not distinct heads below {v.num}")

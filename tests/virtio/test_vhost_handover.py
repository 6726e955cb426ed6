"""The handed-over vhost-user session's saved state: round trip, every bound, fuzzed decoding."""

from __future__ import annotations

import copy
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost.savedstate import encode_state
from devicehost.virtio import VERSION_1, DeviceTraits
from devicehost.virtio.vhost_handover import (
    HandedQueue,
    HandedRegion,
    HandedVring,
    PendingMessage,
    VhostHandoverError,
    VhostUserHandover,
    decode_device_state_untrusted,
    decode_vhost_handover_untrusted,
    encode_vhost_handover,
)
from devicehost.virtio.vhost_message import USER_F_PROTOCOL_FEATURES
from devicehost.virtio.vhost_session import PROTOCOL_FEATURES

TRAITS = DeviceTraits(device_id=0x7F, queue_count=2, max_queue_size=256)
FEATURES = 1 << VERSION_1 | 1 << USER_F_PROTOCOL_FEATURES


def _vring(i: int, inflight: tuple[int, ...] = ()) -> HandedVring:
    base = 0x10000 * (i + 1)
    return HandedVring(64, base, base + 0x1000, base + 0x2000, 3, True, True, 3 + 3 * i,
                       4 + 3 * i, 5 + 3 * i, HandedQueue(7, 5, inflight))


def _state(**changes: Any) -> VhostUserHandover:
    state = VhostUserHandover(
        listener=0, connection=1, handshake=False, features=FEATURES,
        protocol_features=PROTOCOL_FEATURES, owner=True,
        regions=(HandedRegion(0, 1 << 20, 0x7F00_0000_0000, 0, 2, "memfd"),),
        vrings=(_vring(0, (4, 2)), _vring(1)), device_open=True, device_running=True,
        device_type="dh_vstream.State", device_version=1, device_payload=b'{"tx_bytes":1}',
        pending=PendingMessage(24, 1, b"\x01" * 8, ((20, "eventfd"),)))
    return attrs.evolve(state, **changes)


def _decode(state: VhostUserHandover | dict[str, Any]) -> VhostUserHandover:
    payload = encode_vhost_handover(state) if isinstance(state, VhostUserHandover) else state
    return decode_vhost_handover_untrusted(payload, TRAITS, PROTOCOL_FEATURES)


def test_a_session_round_trips() -> None:
    state = _state()
    assert _decode(state) == state
    idle = _state(connection=None, regions=(), pending=None, device_open=False,
                  device_running=False, vrings=(HandedVring(0, None, None, None, 0, False, False,
                                                            None, None, None, None),) * 2,
                  device_type="", device_version=0, device_payload=b"")
    assert _decode(idle) == idle


@pytest.mark.parametrize(("changes", "error"), [
    ({"features": FEATURES | 1 << 40}, "never offered"),
    ({"protocol_features": 1 << 63}, "protocol features"),
    ({"vrings": (_vring(0),)}, "1 vrings; the device has 2"),
    ({"vrings": (attrs.evolve(_vring(0), num=48), _vring(1))}, "not a power of two"),
    ({"vrings": (attrs.evolve(_vring(0), num=512), _vring(1))}, "up to 256"),
    ({"vrings": (attrs.evolve(_vring(0), base=1 << 16), _vring(1))}, "16-bit"),
    ({"vrings": (attrs.evolve(_vring(0), desc=0x10008), _vring(1))}, "misaligned"),
    ({"vrings": (attrs.evolve(_vring(0), avail=None), _vring(1))}, "not all"),
    ({"vrings": (attrs.evolve(_vring(0), kick=None), _vring(1))}, "without a kick"),
    ({"vrings": (_vring(0, (64,)), _vring(1))}, "not distinct heads below 64"),
    ({"vrings": (_vring(0, (3, 3)), _vring(1))}, "not distinct heads"),
    ({"vrings": (attrs.evolve(_vring(0), queue=HandedQueue(1 << 16, 0, ())), _vring(1))},
     "not 16-bit"),
    ({"vrings": (attrs.evolve(_vring(0), queue=None), _vring(1))}, "no queue state"),
    ({"device_open": False}, "closed device is running"),
    ({"device_type": ""}, "has no type"),
    ({"regions": (HandedRegion(0, 0, 0, 0, 2, "memfd"),)}, "out of range"),
    ({"regions": (HandedRegion((1 << 64) - 4096, 8192, 0, 0, 2, "memfd"),)}, "out of range"),
    ({"regions": (HandedRegion(0, 8192, 0, 0, 2, "memfd"),
                  HandedRegion(4096, 8192, 0, 0, 30, "memfd"))}, "overlap"),
    ({"regions": (HandedRegion(0, 8192, 0, 0, 2, "socket"),)}, "backed by a 'socket'"),
    ({"regions": tuple(HandedRegion(i << 20, 4096, 0, 0, 30 + i, "memfd")
                       for i in range(9))}, "9 memory regions"),
    ({"connection": None}, "without a connection"),
    ({"listener": 1}, "repeated"),
    ({"pending": PendingMessage(24, 1, b"", tuple((30 + i, "eventfd") for i in range(9)))},
     "9 descriptors"),
    ({"pending": PendingMessage(24, 1, b"", ((30, "socket"),))}, "kind no message uses"),
    ({"pending": PendingMessage(24, 1, b"x" * 5000, ())}, "5000 bytes"),
    ({"pending": PendingMessage(1 << 32, 1, b"", ())}, "header is out of range"),
])
def test_every_bound_is_checked(changes: dict[str, Any], error: str) -> None:
    with pytest.raises(VhostHandoverError, match=error):
        _decode(_state(**changes))


def test_the_device_state_inside_is_decoded_by_its_registered_type() -> None:
    with pytest.raises(VhostHandoverError, match="not JSON"):
        decode_device_state_untrusted(_state(device_payload=b"\xff"), "vs", "vstream")
    with pytest.raises(VhostHandoverError, match="not an object"):
        decode_device_state_untrusted(_state(device_payload=b"[1]"), "vs", "vstream")
    assert decode_device_state_untrusted(_state(device_open=False), "vs", "vstream") is None
    from devicehost.errors import SavedStateError

    with pytest.raises(SavedStateError, match="unknown saved-state type"):
        decode_device_state_untrusted(_state(device_type="nobody.Knows"), "vs", "vstream")


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(_json)
def test_fuzz_any_json_is_refused_with_one_error_type(payload: Any) -> None:
    with pytest.raises(VhostHandoverError):  # it lacks the fields: refused, and only so
        _decode(payload if isinstance(payload, dict) else {"x": payload})


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _paths(v, (*prefix, k))] or [prefix]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _paths(v, (*prefix, i))] or [prefix]
    return [prefix]


_VALID = encode_state(_state())
_PATHS = _paths(_VALID)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(_PATHS), _json)
def test_fuzz_one_field_of_a_valid_state_replaced(path: tuple[Any, ...], value: Any) -> None:
    payload = copy.deepcopy(_VALID)
    node: Any = payload
    for key in path[:-1]:
        node = node[key]
    if path:
        node[path[-1]] = value
    try:
        state = _decode(payload)
    except VhostHandoverError:
        return
    assert isinstance(state, VhostUserHandover)

"""Saved-state envelope: round trips, and a decoder that treats its input as hostile."""

from __future__ import annotations

import base64
import contextlib
import enum
import json
import re
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost.errors import SavedStateError
from devicehost.savedstate import (
    MAX_DEPTH,
    MAX_ENVELOPE_BYTES,
    NoSavedState,
    SavedEntry,
    decode_envelope_untrusted,
    decode_state_untrusted,
    encode_envelope,
    encode_state,
    entry_for,
    saved_state,
    saved_state_type,
)


class Phase(enum.Enum):
    VERSION_REQUEST = 1
    READY = 2


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


@attrs.frozen
class Inner:
    tag: str
    data: bytes
    colour: Colour


@saved_state("tests.SavedState", 3)
@attrs.frozen
class State:
    phase: Phase
    counter: int
    ok: bool
    note: str | None
    inners: tuple[Inner, ...]
    pairs: list[tuple[int, bytes]]
    nothing: None = None


def sample() -> State:
    return State(
        phase=Phase.READY,
        counter=-(2**63),
        ok=True,
        note=None,
        inners=(Inner("a", b"\x00\xff", Colour.BLUE),),
        pairs=[(2**64 - 1, b"")],
    )


def envelope_of(*values: tuple[str, str, object]) -> bytes:
    return encode_envelope([entry_for(device, plugin, value) for device, plugin, value in values])


def test_round_trip() -> None:
    data = envelope_of(("files", "vmbfs", sample()), ("idle", "vsock", NoSavedState()))
    document = json.loads(data)
    assert document["format"] == "devicehost-saved-state"
    assert document["version"] == 1
    assert document["devices"][0]["type"] == "tests.SavedState"
    assert document["devices"][0]["type_version"] == 3
    assert document["devices"][0]["payload"]["inners"][0]["data"] == base64.b64encode(
        b"\x00\xff"
    ).decode()
    assert document["devices"][0]["payload"]["phase"] == 2
    assert document["devices"][1] == {
        "device": "idle", "plugin": "vsock", "type": "save_restore.NoSavedState",
        "type_version": 1, "payload": {},
    }
    entries = decode_envelope_untrusted(data)
    assert [(e.device, e.plugin, e.type_name) for e in entries] == [
        ("files", "vmbfs", "tests.SavedState"), ("idle", "vsock", "save_restore.NoSavedState")
    ]
    assert decode_state_untrusted(entries[0], State) == sample()
    assert decode_state_untrusted(entries[0]) == sample()
    assert decode_state_untrusted(entries[1], NoSavedState) == NoSavedState()
    assert saved_state_type("save_restore.NoSavedState") is NoSavedState


def test_decoding_checks_type_name_and_version() -> None:
    (entry,) = decode_envelope_untrusted(envelope_of(("files", "vmbfs", sample())))
    with pytest.raises(SavedStateError, match=re.escape(
        "device 'files': saved state has type 'tests.SavedState', expected"
        " 'save_restore.NoSavedState'"
    )):
        decode_state_untrusted(entry, NoSavedState)
    old = attrs.evolve(entry, type_version=2)
    with pytest.raises(SavedStateError, match=re.escape(
        "device 'files': saved state 'tests.SavedState' has version 2, this plugin reads"
        " version 3"
    )):
        decode_state_untrusted(old, State)
    unknown = attrs.evolve(entry, type_name="nobody.Knows")
    with pytest.raises(SavedStateError, match=re.escape("unknown saved-state type 'nobody.Knows'")):
        decode_state_untrusted(unknown)


def payload_error(payload: dict[str, Any]) -> str:
    entry = SavedEntry("files", "vmbfs", "tests.SavedState", 3, payload)
    with pytest.raises(SavedStateError) as info:
        decode_state_untrusted(entry, State)
    return str(info.value)


def good_payload() -> dict[str, Any]:
    return encode_state(sample())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"phase": 7}, "tests.SavedState.phase: 7 is not a Phase value"),
        ({"phase": True}, "tests.SavedState.phase: expected Phase, got bool"),
        ({"counter": "1"}, "tests.SavedState.counter: expected int, got str"),
        ({"counter": 2**64}, "tests.SavedState.counter: integer is out of the 64-bit range"),
        ({"counter": 1.0}, "tests.SavedState.counter: expected int, got float"),
        ({"ok": 1}, "tests.SavedState.ok: expected bool, got int"),
        ({"note": 5}, "tests.SavedState.note: expected str, got int"),
        ({"note": "\ud800"}, "tests.SavedState.note: string holds a lone surrogate"),
        ({"inners": {}}, "tests.SavedState.inners: expected array, got dict"),
        ({"inners": [{"tag": "a", "data": "!!", "colour": "red"}]},
         "tests.SavedState.inners[0].data: invalid base64 bytes"),
        ({"inners": [{"tag": "a", "data": "", "colour": "green"}]},
         "tests.SavedState.inners[0].colour: 'green' is not a Colour value"),
        ({"inners": [{"tag": "a", "data": ""}]},
         "tests.SavedState.inners[0]: missing field 'colour' of Inner"),
        ({"pairs": [[1]]}, "tests.SavedState.pairs[0]: expected 2 items, got 1"),
        ({"nothing": 0}, "tests.SavedState.nothing: expected null, got int"),
        ({"surprise": 1}, "tests.SavedState: unknown field 'surprise' for State"),
    ],
)
def test_every_field_is_type_checked(change: dict[str, Any], message: str) -> None:
    assert payload_error(good_payload() | change) == f"device 'files': {message}"


def test_missing_field_and_validator_failures() -> None:
    payload = good_payload()
    del payload["counter"]
    assert payload_error(payload).endswith("missing field 'counter' of State")

    @saved_state("tests.Validated", 1)
    @attrs.frozen
    class Validated:
        size: int = attrs.field(validator=attrs.validators.ge(0))

    entry = SavedEntry("d", "p", "tests.Validated", 1, {"size": -1})
    with pytest.raises(SavedStateError, match="Validated rejected the value: 'size' must be >= 0"):
        decode_state_untrusted(entry, Validated)


def test_encoding_checks_the_value_against_its_schema() -> None:
    # Deliberately the wrong type (hence the ignore): encoding must reject it.
    bad = attrs.evolve(sample(), counter="many")  # type: ignore[arg-type]
    with pytest.raises(SavedStateError, match=r"tests\.SavedState\.counter: expected int, got str"):
        entry_for("files", "vmbfs", bad)
    with pytest.raises(SavedStateError, match="out of the 64-bit range"):
        entry_for("files", "vmbfs", attrs.evolve(sample(), counter=2**64))
    with pytest.raises(SavedStateError, match="is not a registered saved-state type"):
        entry_for("files", "vmbfs", Inner("a", b"", Colour.RED))


def test_registration_rules() -> None:
    with pytest.raises(ValueError, match="not dotted"):
        saved_state("Flat", 1)
    with pytest.raises(ValueError, match="version must be an int >= 1"):
        saved_state("a.B", 0)
    with pytest.raises(TypeError, match="is not an attrs class"):
        saved_state("a.C", 1)(int)

    @attrs.frozen
    class Impostor:
        x: int = 0

    with pytest.raises(TypeError, match=re.escape("'save_restore.NoSavedState' is taken by")):
        saved_state("save_restore.NoSavedState", 1)(Impostor)

    @attrs.frozen
    class Derived(NoSavedState):
        pass

    with pytest.raises(SavedStateError, match="Derived is not a registered saved-state type"):
        entry_for("d", "p", Derived())


def envelope(**changes: Any) -> bytes:
    document: dict[str, Any] = {
        "format": "devicehost-saved-state",
        "version": 1,
        "devices": [{"device": "d", "plugin": "p", "type": "save_restore.NoSavedState",
                     "type_version": 1, "payload": {}}],
    }
    for key, value in changes.items():
        if key.startswith("entry_"):
            document["devices"][0][key[6:]] = value
        else:
            document[key] = value
    return json.dumps(document).encode()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xff", "saved state: not UTF-8 at byte 0"),
        (b"{", "saved state: not valid JSON"),
        (b"[]", "saved state: expected a JSON object, got list"),
        (b'{"a": NaN}', "saved state: NaN is not allowed"),
        (b'{"a": 1, "a": 2}', "saved state: duplicate key 'a'"),
        (b"[" * 100_000 + b"]" * 100_000, "saved state: nesting deeper than 64 levels"),
        (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "nesting deeper than 64 levels"),
        (b"1" * 5000, "saved state: not valid JSON"),
        (envelope(format="qemu"), "not a devicehost saved-state file (format 'qemu'"),
        (envelope(version=2), "envelope version 2 is not supported (this host reads version 1)"),
        (envelope(version=1.0), "envelope version 1.0 is not supported"),
        (envelope(extra=1), "saved state: unknown keys ['extra']"),
        (envelope(devices={}), "saved state: devices: expected an array, got dict"),
        (envelope(devices=[1]), "saved state: devices[0]: expected an object, got int"),
        (envelope(entry_device=""), "saved state: devices[0].device: expected a non-empty"),
        (envelope(entry_plugin=3), "saved state: devices[0].plugin: expected a non-empty"),
        (envelope(entry_type="NoDots"), "devices[0].type: 'NoDots' is not a saved-state type"),
        (envelope(entry_type_version=0), "devices[0].type_version: expected a positive integer"),
        (envelope(entry_type_version=True), "devices[0].type_version: expected a positive"),
        (envelope(entry_payload=[]), "devices[0].payload: expected an object, got list"),
        (envelope(entry_more=1), "devices[0]: unknown keys ['more']"),
    ],
)
def test_hostile_envelopes(data: bytes, message: str) -> None:
    with pytest.raises(SavedStateError) as info:
        decode_envelope_untrusted(data)
    assert message in str(info.value)


def test_size_limit_and_duplicate_devices() -> None:
    with pytest.raises(SavedStateError, match="larger than 16777216 bytes"):
        decode_envelope_untrusted(b" " * (MAX_ENVELOPE_BYTES + 1))
    twice = [entry_for("d", "p", NoSavedState()), entry_for("d", "q", NoSavedState())]
    with pytest.raises(SavedStateError, match=r"devices\[1\]\.device: device 'd' appears twice"):
        encode_envelope(twice)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_raw_bytes_only_raise_saved_state_error(data: bytes) -> None:
    try:
        entries = decode_envelope_untrusted(data)
    except SavedStateError:
        return
    for entry in entries:
        with contextlib.suppress(SavedStateError):
            decode_state_untrusted(entry)


@settings(max_examples=300, deadline=None)
@given(json_values, st.sampled_from(["payload", "inners", "pairs", "phase", "device", "type"]))
def test_fuzz_structured_mutations_only_raise_saved_state_error(value: Any, where: str) -> None:
    document = json.loads(envelope_of(("files", "vmbfs", sample())))
    entry = document["devices"][0]
    if where in ("payload", "device", "type"):
        entry[where] = value
    else:
        entry["payload"][where] = value
    data = json.dumps(document).encode()
    with contextlib.suppress(SavedStateError):
        (decoded,) = decode_envelope_untrusted(data)
        decode_state_untrusted(decoded, State)


states = st.builds(
    State,
    phase=st.sampled_from(Phase),
    counter=st.integers(-(2**63), 2**64 - 1),
    ok=st.booleans(),
    note=st.none() | st.text().filter(lambda s: not any(0xD800 <= ord(c) < 0xE000 for c in s)),
    inners=st.lists(
        st.builds(Inner, tag=st.text(alphabet="abc"), data=st.binary(max_size=20),
                  colour=st.sampled_from(Colour)),
        max_size=3,
    ).map(tuple),
    pairs=st.lists(st.tuples(st.integers(0, 9), st.binary(max_size=5)), max_size=3),
)


@settings(max_examples=200, deadline=None)
@given(states)
def test_fuzz_round_trip(state: State) -> None:
    (entry,) = decode_envelope_untrusted(envelope_of(("dev", "plug", state)))
    assert decode_state_untrusted(entry, State) == state


# -- bounded echoes of hostile values (issue 14: 8) ---------------------------------------------

HUGE = "a" * 100_000
CUT = f"'{'a' * 60}…' (100000 characters, 99940 not shown)"
NESTED_CUT = f"'{'a' * 20}…' (100000 characters, 99980 not shown)"


def _error(data: bytes, expected: type | None = None) -> str:
    with pytest.raises(SavedStateError) as info:
        (entry,) = decode_envelope_untrusted(data)
        decode_state_untrusted(entry, expected)
    return str(info.value)


@pytest.mark.parametrize(("where", "value", "message"), [
    ("phase", HUGE, f"device 'files': tests.SavedState.phase: {CUT} is not a Phase value"),
    ("format", HUGE, f"saved state: not a devicehost saved-state file (format {CUT}, expected"),
    ("version", HUGE, f"saved state: envelope version {CUT} is not supported"),
    ("field", HUGE, f"device 'files': tests.SavedState: unknown field {CUT} for State"),
    ("envelope_key", HUGE, f"saved state: unknown keys [{NESTED_CUT}]"),
    ("entry_key", HUGE, f"saved state: devices[0]: unknown keys [{NESTED_CUT}]"),
    ("duplicate", HUGE, f"saved state: duplicate key {CUT}"),
])
def test_hostile_values_are_echoed_shortened(where: str, value: str, message: str) -> None:
    document = json.loads(envelope_of(("files", "vmbfs", sample())))
    entry = document["devices"][0]
    if where == "phase":
        entry["payload"]["phase"] = value
    elif where in ("format", "version"):
        document[where] = value
    elif where == "field":
        entry["payload"][value] = 1
    elif where == "envelope_key":
        document[value] = 1
    elif where == "entry_key":
        entry[value] = 1
    data = json.dumps(document).encode()
    if where == "duplicate":
        data = b'{"' + value.encode() + b'": 1, "' + value.encode() + b'": 2}'
    text = _error(data, State)
    assert message in text
    assert len(text) < 400


def test_many_unknown_keys_are_listed_bounded() -> None:
    document = json.loads(envelope(**{f"k{i:06}": 1 for i in range(10_000)}))
    text = _error(json.dumps(document).encode())
    assert text.startswith("saved state: unknown keys ['k000000', 'k000001'")
    assert len(text) < 400


def test_a_validator_quoting_the_whole_value_is_cut() -> None:
    @saved_state("tests.Checked", 1)
    @attrs.frozen
    class Checked:
        text: str = attrs.field(validator=attrs.validators.matches_re("^ok$"))

    data = json.dumps({"format": "devicehost-saved-state", "version": 1, "devices": [
        {"device": "d", "plugin": "p", "type": "tests.Checked", "type_version": 1,
         "payload": {"text": HUGE}}]}).encode()
    text = _error(data, Checked)
    assert "Checked rejected the value: (\"'text' must match regex" in text
    assert "not shown)" in text and len(text) < 400


def test_deep_payload_handed_in_without_an_envelope_is_a_saved_state_error() -> None:
    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    entry = SavedEntry("d", "p", "tests.SavedState", 3, {"inners": deep})
    with pytest.raises(SavedStateError, match=r"tests\.SavedState"):
        decode_state_untrusted(entry, State)


hostile_json = st.one_of(
    json_values,
    st.integers(0, 300_000).map(lambda n: "x" * n),
    st.integers(0, 2000).map(lambda n: [[]] * n),
    st.integers(0, 10**6).map(lambda n: {"k" * (n % 5000): n}),
)


@settings(max_examples=200, deadline=None)
@given(hostile_json, st.sampled_from(["payload", "inners", "pairs", "phase", "note", "device",
                                      "type", "format", "version", "type_version"]))
def test_fuzz_hostile_values_only_raise_bounded_saved_state_errors(
    value: Any, where: str
) -> None:
    document = json.loads(envelope_of(("files", "vmbfs", sample())))
    entry = document["devices"][0]
    if where in ("format", "version"):
        document[where] = value
    elif where in ("payload", "device", "type", "type_version"):
        entry[where] = value
    else:
        entry["payload"][where] = value
    try:
        (decoded,) = decode_envelope_untrusted(json.dumps(document).encode())
        decode_state_untrusted(decoded, State)
    except SavedStateError as exc:
        assert len(str(exc)) < 600

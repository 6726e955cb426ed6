"""Host save/restore: one envelope for every transport and device; hostile saved state refused."""

from __future__ import annotations

import json
import os
import re
import signal
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devicehost import DeviceContext, DeviceState, LocalOffer, hookimpl
from devicehost.errors import ConfigError, SavedStateError
from devicehost.host import (
    VMBUS_ENTRY,
    Host,
    NotSaved,
    open_host,
)
from devicehost.memory import DmaAllocator, GuestMemory
from devicehost.savedstate import (
    MAX_ENVELOPE_BYTES,
    decode_envelope_untrusted,
    decode_state_untrusted,
    encode_envelope,
    entry_for,
    saved_state,
)
from devicehost.serving import run_host
from devicehost.statefile import read_state_file, remove_stale_temporaries, write_state_file
from devicehost.testing import StaticRegistry
from devicehost.testing.registry import DeviceSpec
from devicehost.vmbus.client import VmbusClient
from devicehost.vmbus.guid import Guid
from devicehost.vmbus.server import SavedChannel, ServerSavedState, VmbusServer
from devicehost.vmbus.transport import VmbusTransport
from devicehost_vmbfs.client import VmbfsClient
from devicehost_vmbfs.core import ProtocolState
from devicehost_vmbfs.device import VmbfsConfig, VmbfsDevice, VmbfsSavedState
from devicehost_vmbfs.protocol import MAX_MESSAGE_SIZE, encode_get_file_info_request

pytestmark = pytest.mark.anyio

IFACE = Guid.parse("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")
INST = Guid.parse("12345678-9abc-4def-8123-456789abcdef")


@saved_state("hosttest.CounterState", 1)
@attrs.frozen
class CounterState:
    value: int
    runs: int


class CounterRunner:
    def __init__(self, value: int = 0, runs: int = 0) -> None:
        self.value = value
        self.runs = runs


#: Every (device name, hook) call made by the devices below, across hosts.
CALLS: list[tuple[str, str]] = []


class Counter:
    """A local device whose runner holds a value and counts its runs; saves both."""

    def __init__(self, config: Any = None) -> None:
        pass

    @hookimpl
    def offer(self, ctx: DeviceContext) -> LocalOffer:
        CALLS.append((ctx.name, "offer"))
        return LocalOffer({"name": ctx.name})

    @hookimpl
    def open(self, ctx: DeviceContext, resources: LocalOffer) -> CounterRunner:
        CALLS.append((ctx.name, "open"))
        return CounterRunner()

    @hookimpl
    def run(self, ctx: DeviceContext, runner: CounterRunner) -> Any:
        runner.runs += 1
        return anyio.sleep_forever()

    @hookimpl
    def save_open(self, ctx: DeviceContext, runner: CounterRunner) -> CounterState | None:
        return CounterState(runner.value, runner.runs)

    @hookimpl
    def restore_open(self, ctx: DeviceContext, state: CounterState,
                     resources: LocalOffer) -> CounterRunner:
        CALLS.append((ctx.name, "restore_open"))
        if state.value < 0:
            raise ValueError("a negative value cannot be restored")
        return CounterRunner(state.value, state.runs)


class NoSave(Counter):
    @hookimpl
    def save_open(self, ctx: DeviceContext, runner: CounterRunner) -> None:
        return None


class BadSave(Counter):
    @hookimpl
    def save_open(self, ctx: DeviceContext, runner: CounterRunner) -> CounterState:
        raise OSError("disk on fire")


@attrs.frozen
class Config:
    devices: tuple[DeviceSpec, ...]


CLASSES = {"counter": Counter, "nosave": NoSave, "badsave": BadSave, "vmbfs": VmbfsDevice}
REGISTRY = StaticRegistry(CLASSES)


def config(*specs: tuple[str, str] | DeviceSpec) -> Config:
    return Config(tuple(s if isinstance(s, DeviceSpec) else DeviceSpec(*s) for s in specs))


def layout(data: bytes) -> list[tuple[str, str, str]]:
    return [(e.device, e.plugin, e.type_name) for e in decode_envelope_untrusted(data)]


def runner_of(host: Host, name: str) -> CounterRunner:
    runner = host.devices[name].runner
    assert isinstance(runner, CounterRunner)
    return runner


async def test_local_state_round_trips_and_unsaved_devices_are_offered_fresh() -> None:
    cfg = config(("a", "counter"), ("b", "nosave"), ("c", "badsave"))
    async with open_host(REGISTRY, cfg) as host:
        runner_of(host, "a").value = 41
        runner_of(host, "b").value = 7
        data = await host.save()
        assert all(d.state is not DeviceState.RUNNING for d in host.devices.values())
    assert layout(data) == [("a", "counter", "hosttest.CounterState"),
                            ("b", "nosave", "host.NotSaved"),
                            ("c", "badsave", "host.NotSaved")]
    entries = {e.device: e for e in decode_envelope_untrusted(data)}
    assert decode_state_untrusted(entries["a"], CounterState) == CounterState(41, 1)
    assert decode_state_untrusted(entries["b"], NotSaved) == NotSaved("save not supported")
    assert "disk on fire" in decode_state_untrusted(entries["c"], NotSaved).reason
    CALLS.clear()
    async with open_host(REGISTRY, cfg, saved=data) as host:
        assert host.restore_report == {
            "a": "restored",
            "b": "fresh: not saved ('save not supported')",
            "c": f"fresh: not saved ({decode_state_untrusted(entries['c'], NotSaved).reason!r})",
        }
        assert all(d.state is DeviceState.RUNNING for d in host.devices.values())
        # The restored runner continues from the saved value (and this is its second run).
        assert (runner_of(host, "a").value, runner_of(host, "a").runs) == (41, 2)
        assert (runner_of(host, "b").value, runner_of(host, "b").runs) == (0, 1)
        assert ("a", "restore_open") in CALLS and ("a", "open") not in CALLS
        assert ("b", "open") in CALLS


async def test_new_device_is_offered_fresh_and_a_failed_restore_opens_fresh() -> None:
    bad = encode_envelope([entry_for("a", "counter", CounterState(-1, 3))])
    async with open_host(REGISTRY, config(("a", "counter"), ("new", "counter")),
                         saved=bad) as host:
        assert host.restore_report["new"] == "new"
        assert host.restore_report["a"].startswith("fresh: restore failed (")
        assert "negative value" in host.restore_report["a"]
        assert host.devices["a"].state is DeviceState.RUNNING
        assert (runner_of(host, "a").value, runner_of(host, "a").runs) == (0, 1)


@pytest.mark.parametrize(("data", "message"), [
    (b"\xff garbage", "not UTF-8"),
    (b'{"format": "devicehost-saved-state", "version": 2, "devices": []}', "version 2"),
    (encode_envelope([entry_for("gone", "counter", CounterState(1, 1))]),
     "device 'gone' (plugin 'counter'), which the config does not have"),
    (encode_envelope([entry_for("a", "nosave", CounterState(1, 1))]),
     "saved by plugin 'nosave', but the config serves it with plugin 'counter'"),
    (encode_envelope([entry_for("a", "counter", NotSaved("x"))]).replace(
        b"host.NotSaved", b"host.Unknown"), "unknown saved-state type 'host.Unknown'"),
    (encode_envelope([entry_for("@disk", "host", NotSaved("x"))]), "unknown host entry '@disk'"),
    (encode_envelope([entry_for(VMBUS_ENTRY, "host", CounterState(1, 1))]),
     "expected 'vmbus.ServerSavedState'"),
    (encode_envelope([entry_for(VMBUS_ENTRY, "host", ServerSavedState(()))]).replace(
        b'"channels":[]', b'"channels":[{"interface_id":"nope","instance_id":"x",'
        b'"subchannel_index":0,"channel_id":1,"gpadls":[],"open":null}]'),
     "a channel's GUID is invalid"),
    (encode_envelope([entry_for(VMBUS_ENTRY, "host", ServerSavedState(tuple(
        SavedChannel(str(IFACE), str(inst), 0, 5, ()) for inst in (IFACE, INST))))]),
     "channel 5 repeats an offer or a channel id"),
])
async def test_hostile_saved_state_is_refused_before_anything_is_served(
    data: bytes, message: str
) -> None:
    CALLS.clear()
    with pytest.raises(SavedStateError, match=r"^state\.bin: ") as info:
        async with open_host(REGISTRY, config(("a", "counter")), saved=data,
                             saved_source="state.bin"):
            pytest.fail("the host started")
    assert message in str(info.value) and "the host does not start" in str(info.value)
    assert CALLS == []


async def test_a_vmbus_state_the_server_refuses_stops_the_host_before_serving(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(self: VmbusServer, state: ServerSavedState) -> None:
        raise ValueError("saved state repeats an offer")

    monkeypatch.setattr(VmbusServer, "restore", refuse)
    data = encode_envelope([entry_for(VMBUS_ENTRY, "host", ServerSavedState(()))])
    memory = GuestMemory.memfd(1024 * 1024)
    CALLS.clear()
    try:
        with pytest.raises(SavedStateError) as info:
            async with open_host(REGISTRY, config(("a", "counter")), saved=data,
                                 saved_source="state.bin", guest_memory=memory):
                pytest.fail("the host started")
    finally:
        memory.close()
    assert str(info.value) == ("state.bin: device '@vmbus': saved state repeats an offer;"
                               " the host does not start")
    assert CALLS == []


async def _open_or_refuse(data: bytes) -> None:
    try:
        async with open_host(REGISTRY, config(("a", "counter")), saved=data) as host:
            assert host.devices["a"].state is DeviceState.RUNNING
    except SavedStateError:
        pass


_VALID = encode_envelope([entry_for("a", "counter", CounterState(5, 1))])


@settings(max_examples=200, deadline=None)
@given(st.one_of(
    st.binary(max_size=300),
    st.tuples(st.integers(0, len(_VALID) - 1), st.binary(min_size=1, max_size=8)).map(
        lambda t: _VALID[:t[0]] + t[1] + _VALID[t[0] + len(t[1]):]),
))
def test_any_bytes_restore_or_fail_with_saved_state_error(data: bytes) -> None:
    anyio.run(_open_or_refuse, data)


VMBFS_REPLY = struct.pack("<IIIIQ", 4, 0, 0, 0, 10)  # GET_FILE_INFO reply: 10-byte file


def vmbfs_config(tmp_path: Path) -> Config:
    (tmp_path / "hive").write_bytes(b"hive bytes")
    return config(DeviceSpec("fs", "vmbfs", VmbfsConfig(file=str(tmp_path / "hive"))),
                  ("a", "counter"))


async def test_vmbus_device_continues_in_guest_memory_that_survived(tmp_path: Path) -> None:
    cfg = vmbfs_config(tmp_path)
    memory = GuestMemory.memfd(8 * 1024 * 1024)
    try:
        with anyio.fail_after(20):
            async with open_host(REGISTRY, cfg, guest_memory=memory) as host:
                # The guest is the test's: its client and allocator outlive the host.
                client = VmbusClient(host.transport(VmbusTransport).server, DmaAllocator(memory))
                channel = await client.open(await client.wait_offer(lambda o: True))
                await VmbfsClient(channel.message_pipe()).negotiate()  # now Ready
                runner_of(host, "a").value = 3
                data = await host.save()
            entries = {e.device: e for e in decode_envelope_untrusted(data)}
            assert list(entries) == [VMBUS_ENTRY, "fs", "a"]
            server_state = decode_state_untrusted(entries[VMBUS_ENTRY], ServerSavedState)
            (saved_channel,) = server_state.channels
            assert saved_channel.open is not None
            assert saved_channel.channel_id == channel.channel_id
            assert decode_state_untrusted(entries["fs"], VmbfsSavedState) == VmbfsSavedState(
                ProtocolState.READY)
            async with open_host(REGISTRY, cfg, saved=data, guest_memory=memory) as host:
                assert host.restore_report == {"fs": "restored", "a": "restored"}
                assert host.devices["fs"].state is DeviceState.RUNNING
                await client.reconnect(host.transport(VmbusTransport).server)
                # No new version exchange: the next GET_FILE_INFO is answered at once.
                pipe = channel.message_pipe()
                await pipe.send(encode_get_file_info_request("/imc.hiv"))
                assert await pipe.recv(MAX_MESSAGE_SIZE) == VMBFS_REPLY
                assert runner_of(host, "a").value == 3
                await client.aclose()
    finally:
        memory.close()


async def test_without_surviving_guest_memory_vmbus_devices_are_offered_fresh(
    tmp_path: Path,
) -> None:
    cfg = vmbfs_config(tmp_path)
    with anyio.fail_after(20):
        async with open_host(REGISTRY, cfg) as host:
            client = host.transport(VmbusTransport).client()
            channel = await client.open(await client.wait_offer(lambda o: True))
            await VmbfsClient(channel.message_pipe()).negotiate()
            runner_of(host, "a").value = 9
            data = await host.save()
        async with open_host(REGISTRY, cfg, saved=data) as host:
            assert host.restore_report == {
                "fs": "fresh: its VMBus channel did not survive", "a": "restored"}
            assert host.devices["fs"].state is DeviceState.OFFERED
            assert runner_of(host, "a").value == 9
            # A new guest opens the fresh offer and negotiates from the start.
            client = host.transport(VmbusTransport).client()
            channel = await client.open(await client.wait_offer(lambda o: True))
            vmbfs = VmbfsClient(channel.message_pipe())
            await vmbfs.negotiate()
            assert await vmbfs.read_file("/imc.hiv") == b"hive bytes"


async def test_closed_vmbus_channel_is_recorded_not_saved(tmp_path: Path) -> None:
    async with open_host(REGISTRY, vmbfs_config(tmp_path)) as host:
        data = await host.save()
    entries = {e.device: e for e in decode_envelope_untrusted(data)}
    assert decode_state_untrusted(entries["fs"], NotSaved) == NotSaved("channel closed")
    assert decode_state_untrusted(entries[VMBUS_ENTRY], ServerSavedState).channels[0].open is None


def test_state_file_is_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    assert read_state_file(path) is None
    write_state_file(path, b"one")
    write_state_file(path, b"two")
    assert read_state_file(path) == b"two"

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("no space left")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="no space left"):
        write_state_file(path, b"three")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    assert path.read_bytes() == b"two"


def test_state_file_reads_are_bounded_and_errors_name_the_file(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b" " * (MAX_ENVELOPE_BYTES + 100))
    with pytest.raises(SavedStateError, match=f"^{re.escape(str(big))}: cannot read the saved"
                       f" state: larger than {MAX_ENVELOPE_BYTES} bytes"):
        read_state_file(big)
    expected = re.escape(f"{tmp_path}: cannot read the saved state")
    with pytest.raises(SavedStateError, match=f"^{expected}"):
        read_state_file(tmp_path)


async def _serve_until_sigterm(cfg: Config, state: Path,
                               seen: Sequence[Host] | None = None) -> int:
    hosts: list[Host] = [] if seen is None else list(seen)

    def ready(host: Host) -> None:
        hosts.append(host)
        os.kill(os.getpid(), signal.SIGTERM)

    with anyio.fail_after(10):
        return await run_host(REGISTRY, cfg, ready=ready, state_file=state)


async def test_run_host_restores_from_and_saves_to_the_state_file(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    cfg = config(("a", "counter"))
    assert await _serve_until_sigterm(cfg, state) == 0
    (entry,) = decode_envelope_untrusted(state.read_bytes())
    assert decode_state_untrusted(entry, CounterState) == CounterState(0, 1)
    assert await _serve_until_sigterm(cfg, state) == 0
    (entry,) = decode_envelope_untrusted(state.read_bytes())
    assert decode_state_untrusted(entry, CounterState) == CounterState(0, 2)
    state.write_text(json.dumps({"format": "devicehost-saved-state"}))
    CALLS.clear()
    expected = re.escape(f"{state}: saved state: envelope version")
    with pytest.raises(SavedStateError, match=f"^{expected}"):
        await _serve_until_sigterm(cfg, state)
    assert CALLS == []


async def test_run_host_refuses_a_state_file_it_could_not_write(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "state.json"
    CALLS.clear()
    with pytest.raises(ConfigError, match="is not a writable directory"):
        await _serve_until_sigterm(config(("a", "counter")), missing)
    assert CALLS == []


async def test_run_host_fails_when_the_state_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_replace(src: str, dst: str) -> None:
        raise OSError("read-only file system")

    monkeypatch.setattr(os, "replace", broken_replace)
    state = tmp_path / "state.json"
    assert await _serve_until_sigterm(config(("a", "counter")), state) == 1
    assert list(tmp_path.iterdir()) == []


# -- hostile state files: FIFOs, and temporaries left by a killed save (issue 14: 5, 9) ---------


def test_a_fifo_state_file_is_refused_without_being_opened(
    tmp_path: Path, call_bounded: Any
) -> None:
    fifo = tmp_path / "state.json"
    os.mkfifo(fifo)
    error = call_bounded(lambda: read_state_file(fifo), fifo)
    assert isinstance(error, SavedStateError)
    assert str(error) == f"{fifo}: cannot read the saved state: not a regular file (a FIFO)"


_KILLED_WRITER = """
import os, sys
from devicehost.statefile import write_state_file
real_fsync = os.fsync
def fsync_then_wait(fd):
    print("written", flush=True)
    sys.stdin.read()  # the parent kills us here, between the write and the rename
os.fsync = fsync_then_wait
write_state_file(sys.argv[1], b"x" * (14 << 20))
"""


def _save_killed_midway(state: Path) -> Path:
    """Run write_state_file in a child killed by SIGKILL after writing its temporary."""
    import subprocess
    import sys

    before = set(state.parent.iterdir())
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(state)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"written\n"
    finally:
        proc.kill()
        proc.wait(timeout=30)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
    (tmp,) = set(state.parent.iterdir()) - before
    assert tmp.stat().st_size == 14 << 20
    return tmp


async def test_run_host_removes_the_temporary_of_a_save_killed_midway(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    write_state_file(state, encode_envelope([entry_for("a", "counter", CounterState(4, 1))]))
    tmp = _save_killed_midway(state)
    assert await _serve_until_sigterm(config(("a", "counter")), state) == 0
    assert not tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    (entry,) = decode_envelope_untrusted(state.read_bytes())
    assert decode_state_untrusted(entry, CounterState) == CounterState(4, 2)


def test_only_stale_temporaries_of_that_state_file_are_removed(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    dead = _save_killed_midway(state)
    hex16 = "0123456789abcdef"
    keep = [
        f".state.json.{os.getpid()}.{hex16}.tmp",  # this process's own (a save in progress)
        f".state.json.1.{hex16}.tmp",  # pid 1 runs: its writer may still be saving
        f".other.json.{dead.name.split('.')[3]}.{hex16}.tmp",  # another state file's
        f".state.json.x.{hex16}.tmp",  # not the pattern
        f".state.json.99999999999.{hex16}.tmp",  # not a pid
        "state.json.tmp",
    ]
    for name in keep:
        (tmp_path / name).write_bytes(b"keep")
    link = tmp_path / dead.name.replace(dead.name.split(".")[4], "f" * 16)
    link.symlink_to(tmp_path / "state.json.tmp")  # a symlink is never removed
    removed = remove_stale_temporaries(state)
    assert removed == [dead] and not dead.exists()
    assert all((tmp_path / name).exists() for name in keep) and link.is_symlink()
    # The next save removes them too.
    dead = _save_killed_midway(state)
    write_state_file(state, b"{}")
    assert not dead.exists() and state.read_bytes() == b"{}"


def test_a_huge_guid_in_the_saved_vmbus_state_is_echoed_shortened() -> None:
    saved = encode_envelope([entry_for(VMBUS_ENTRY, "host", ServerSavedState((
        SavedChannel("a" * 100_000, str(INST), 0, 5, ()),)))])
    with pytest.raises(SavedStateError) as info:
        anyio.run(_open_or_refuse_strictly, saved)
    assert "(100000 characters, 99940 not shown): a GUID has 36 characters" in str(info.value)
    assert len(str(info.value)) < 400


async def _open_or_refuse_strictly(data: bytes) -> None:
    async with open_host(REGISTRY, config(("a", "counter")), saved=data):
        pass

"""The vmbfs device: discovery, config, offer, save/restore, inspect."""

from __future__ import annotations

import json
import os
import re
import struct
import threading
from pathlib import Path

import anyio
import attrs
import pytest

from devicehost import ConfigError, SavedStateError
from devicehost.plugins import list_plugins, load_plugins
from devicehost.savedstate import (
    decode_envelope_untrusted,
    decode_state_untrusted,
    encode_envelope,
    entry_for,
)
from devicehost.vmbus.protocol import DeviceChannel, OfferParams
from devicehost_vmbfs.core import ProtocolState
from devicehost_vmbfs.device import VmbfsConfig, VmbfsDevice, VmbfsSavedState
from devicehost_vmbfs.protocol import (
    BOOT_INSTANCE_ID,
    IMC_INSTANCE_ID,
    INTERFACE_ID,
    MAX_MESSAGE_SIZE,
    encode_get_file_info_request,
    encode_version_request,
)

from .harness import context, resources, served

DATA = os.urandom(30000)


def test_the_host_discovers_the_plugin() -> None:
    (info,) = [i for i in list_plugins(environ={}) if i.name == "vmbfs"]
    assert info.distribution == "devicehost-vmbfs"
    assert info.status == "available"
    registry = load_plugins(["vmbfs"], environ={"DEVICEHOST_LOAD_PLUGINS": "vmbfs"})
    assert registry.device_classes["vmbfs"] is VmbfsDevice
    loaded = registry.info("vmbfs")
    assert loaded is not None and loaded.kind == "device"


@pytest.fixture
def hive(tmp_path: Path) -> VmbfsConfig:
    (tmp_path / "hive").write_bytes(DATA)
    return VmbfsConfig(file=str(tmp_path / "hive"))


def test_offer() -> None:
    device = VmbfsDevice(VmbfsConfig())
    offer = device.offer(context(device.config))
    assert offer == OfferParams(
        interface_name="vmbfs",
        instance_id=IMC_INSTANCE_ID,
        interface_id=INTERFACE_ID,
        channel_type=DeviceChannel(pipe_packets=True),
    )
    assert offer.mmio_megabytes == 0 and offer.subchannel_index == 0


def test_instance_id_config_changes_only_the_offered_instance() -> None:
    device = VmbfsDevice(VmbfsConfig(instance_id=str(BOOT_INSTANCE_ID)))
    offer = device.offer(context(device.config))
    assert offer.instance_id == BOOT_INSTANCE_ID and offer.interface_id == INTERFACE_ID
    with pytest.raises(ConfigError, match="'instance_id' 'nope' is not a GUID"):
        VmbfsDevice(VmbfsConfig(instance_id="nope"))


def test_default_config_serves_an_empty_directory() -> None:
    device = VmbfsDevice(VmbfsConfig())
    info = device.backing.file_info("/")
    assert info.directory
    root = device.backing.describe()["root"]
    assert isinstance(root, str) and os.listdir(root) == []
    assert VmbfsDevice().backing.file_info("").directory  # no config at all


def test_file_config(hive: VmbfsConfig) -> None:
    device = VmbfsDevice(hive)
    assert device.backing.file_info("/imc.hiv").file_size == len(DATA)
    named = VmbfsDevice(VmbfsConfig(file=hive.file, name="boot.bin"))
    assert named.backing.file_info("/boot.bin").file_size == len(DATA)


def test_root_config(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"abc")
    device = VmbfsDevice(VmbfsConfig(root=str(tmp_path)))
    assert device.backing.file_info("/x").file_size == 3


@pytest.mark.parametrize(
    ("config", "keyed"),
    [
        (VmbfsConfig(file="/x", root="/y"), "key 'root' = '/y': set either 'file' or 'root', not"
                                            " both"),
        (VmbfsConfig(file="/nonexistent/vmbfs-hive"),
         "key 'file' = '/nonexistent/vmbfs-hive': cannot be served: No such file or directory"),
        (VmbfsConfig(root="/nonexistent/vmbfs-root"),
         "key 'root' = '/nonexistent/vmbfs-root': cannot be served: No such file or directory"),
        (VmbfsConfig(file="/tmp"), "key 'file' = '/tmp': cannot be served: not a regular file"
                                   " (a directory)"),
        (VmbfsConfig(file="/dev/zero"), "key 'file' = '/dev/zero': cannot be served: not a"
                                        " regular file (a character device)"),
        (VmbfsConfig(root="/dev/null"), "key 'root' = '/dev/null': cannot be served: Not a"
                                        " directory"),
    ],
)
def test_bad_configs_are_config_errors_naming_key_and_value(
    config: VmbfsConfig, keyed: str
) -> None:
    with pytest.raises(ConfigError) as info:
        VmbfsDevice(config)
    assert info.value.keyed() == keyed


def test_name_with_a_separator_is_a_config_error(hive: VmbfsConfig) -> None:
    with pytest.raises(ConfigError) as info:
        VmbfsDevice(VmbfsConfig(file=hive.file, name="a/b"))
    assert (info.value.key, info.value.value) == ("name", "a/b")


@pytest.mark.parametrize("state", list(ProtocolState))
def test_saved_state_round_trips_through_the_envelope(state: ProtocolState) -> None:
    blob = encode_envelope([entry_for("vmbfs0", "vmbfs", VmbfsSavedState(state))])
    assert json.loads(blob)["devices"][0]["type"] == "vmbfs.SavedState"
    assert json.loads(blob)["devices"][0]["payload"] == {"state": state.value}
    (entry,) = decode_envelope_untrusted(blob)
    assert decode_state_untrusted(entry, VmbfsSavedState) == VmbfsSavedState(state)


def test_saved_state_rejects_unknown_states() -> None:
    blob = encode_envelope([entry_for("vmbfs0", "vmbfs", VmbfsSavedState(ProtocolState.READY))])
    (entry,) = decode_envelope_untrusted(blob.replace(b'"ready"', b'"stopped"'))
    with pytest.raises(SavedStateError):
        decode_state_untrusted(entry, VmbfsSavedState)


@pytest.mark.anyio
async def test_save_while_ready_restore_then_get_file_info_is_answered(
    hive: VmbfsConfig,
) -> None:
    async with served(hive) as s:
        with anyio.fail_after(5):
            await s.client.negotiate()
            await s.stop()
            state = s.device.save_open(s.ctx, s.runner)
            assert state == VmbfsSavedState(ProtocolState.READY)
            s.device.close(s.ctx, s.runner, 0)
            # Restore over the same channel: no new version exchange.
            s.runner = s.device.restore_open(s.ctx, state, resources(s.host))
            s.start()
            await s.pipe.send(encode_get_file_info_request("/imc.hiv"))
            assert await s.pipe.recv(MAX_MESSAGE_SIZE) == struct.pack(
                "<IIIIQ", 4, 0, 0, 0, len(DATA)
            )
            assert await s.client.read_file("/imc.hiv") == DATA


@pytest.mark.anyio
async def test_restore_in_version_request_state_expects_the_version(hive: VmbfsConfig) -> None:
    async with served(hive, state=ProtocolState.VERSION_REQUEST) as s:
        with anyio.fail_after(5):
            saved = s.device.save_open(s.ctx, s.runner)
            assert saved == VmbfsSavedState(ProtocolState.VERSION_REQUEST)
            await s.pipe.send(encode_version_request())
            assert await s.pipe.recv(MAX_MESSAGE_SIZE) == bytes.fromhex("020000000000000000000000")


@pytest.mark.anyio
async def test_restored_ready_state_refuses_a_second_version_request(hive: VmbfsConfig) -> None:
    async with served(hive, state=ProtocolState.READY) as s:
        with anyio.fail_after(5):
            await s.pipe.send(encode_version_request())
            await s.done.wait()
        assert s.runner.core.fatal is not None


@pytest.mark.anyio
async def test_inspect(hive: VmbfsConfig) -> None:
    async with served(hive) as s:
        with anyio.fail_after(5):
            await s.client.negotiate()
        tree = s.device.inspect(s.ctx, s.runner)
        assert tree == {
            "backing": {"kind": "file", "name": "imc.hiv"},
            "state": "ready",
            "messages": 1,
            "fatal": None,
            "backing_errors": 0,
            "last_backing_error": None,
        }
        assert s.device.inspect(s.ctx, None) == {"backing": {"kind": "file", "name": "imc.hiv"}}


def test_the_docs_page_lists_every_config_key_with_its_default() -> None:
    page = (Path(__file__).resolve().parents[3] / "docs" / "plugins" / "vmbfs.md").read_text()
    for field in attrs.fields(VmbfsConfig):
        assert f'| `{field.name}` | `"{field.default}"` |' in page, field.name


@pytest.mark.parametrize(("key", "message"), [
    ("file", "'file' .* cannot be served: .*not a regular file (a FIFO)"),
    ("root", "'root' .* cannot be served: .*Not a directory"),
])
def test_a_fifo_file_or_root_is_a_config_error_at_once(
    tmp_path: Path, key: str, message: str
) -> None:
    # A FIFO as 'root' is refused by O_DIRECTORY, as 'file' by its kind: neither is opened for
    # reading, so neither blocks.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    errors: list[BaseException] = []

    def build() -> None:
        try:
            VmbfsDevice(VmbfsConfig(**{key: str(fifo)}))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=build, daemon=True)
    thread.start()
    thread.join(30)
    if thread.is_alive():  # blocked in open(): release it, and fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(30)
        pytest.fail(f"a FIFO as vmbfs {key!r} blocked the device's construction")
    (error,) = errors
    assert isinstance(error, ConfigError)
    assert re.search(message.replace("(", r"\(").replace(")", r"\)"), error.keyed()), error

# SPDX-License-Identifier: MIT
"""The host's pattern and the guest helper's agree, byte for byte (no QEMU needed: gcc only)."""

from __future__ import annotations

import re
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest

from .guestimage import GUEST_SOURCE
from .hostpeer import pattern


def test_pattern_is_consecutive_little_endian_words() -> None:
    data = pattern(0x0102_0304_0506_0700, 20)
    assert data == (
        bytes.fromhex("0007060504030201")
        + bytes.fromhex("0107060504030201")
        + bytes.fromhex("02070605")
    )


@pytest.fixture(scope="module")
def native_vsockctl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is missing")
    binary = tmp_path_factory.mktemp("vsockctl") / "vsockctl"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(GUEST_SOURCE)], check=True, timeout=60)
    return binary


@pytest.mark.parametrize("length", [0, 1, 7, 8, 65535, 65536 + 13, 3 << 20])
def test_vsockctl_checksums_the_same_pattern(native_vsockctl: Path, length: int) -> None:
    # ``cpu`` opens no socket: it is the only command that may run on the host.
    out = subprocess.run(
        [str(native_vsockctl), "cpu", str(length)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    match = re.fullmatch(r"DH CPU bytes=(\d+) crc=([0-9a-f]{8}) ms=[0-9.]+\n", out)
    assert match is not None, out
    assert int(match.group(1)) == length
    assert int(match.group(2), 16) == zlib.crc32(pattern(1, length))

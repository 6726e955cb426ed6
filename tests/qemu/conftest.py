# SPDX-License-Identifier: MIT
"""Fixtures of the QEMU tests: the cached guest image and a short temporary directory.

The support modules beside this file (guestimage, guestvm, devicehostrun, hostpeer) are shared
with ``bench/bench_qemu.py``. They are imported relatively: under ``--import-mode=importlib``
pytest names this directory's modules ``tests.qemu.*`` (as mypy, run with
``--explicit-package-bases``, does), and the benchmark imports them as ``tests.qemu.*`` from the
repository root.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .guestimage import (
    GuestImage,
    GuestSetupError,
    GuestSetupUnavailable,
    prepare_guest_image,
)


@pytest.fixture(scope="session")
def guest_image() -> Iterator[GuestImage]:
    """Install QEMU if needed, fetch the kernel and busybox (cached), build the initramfs."""
    work = Path(tempfile.mkdtemp(prefix="dhq-img-"))
    try:
        try:
            image = prepare_guest_image(work)
        except GuestSetupUnavailable as exc:
            pytest.skip(f"QEMU guest unavailable on this machine: {exc}")
        except GuestSetupError as exc:
            pytest.fail(f"building the QEMU guest failed:\n{exc}", pytrace=False)
        yield image
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path: Unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="dhq-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)

# SPDX-License-Identifier: MIT
"""Fixtures of the QEMU tests: QEMU itself, the cached guest image and a short temporary directory.

Every test marked ``qemu`` must get QEMU from ``qemu_binary`` or ``guest_image`` (which install
it on a fresh machine), never from a ``skipif`` evaluated at collection: ``tests/conftest.py``
refuses such a test at collection.

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
    ensure_qemu,
    prepare_guest_image,
)


@pytest.fixture(scope="session")
def qemu_binary() -> Path:
    """``qemu-system-x86_64``, installed with apt if missing (skips where that is impossible)."""
    try:
        return ensure_qemu()
    except GuestSetupUnavailable as exc:
        pytest.skip(f"QEMU unavailable on this machine: {exc}")
    except GuestSetupError as exc:
        pytest.fail(f"installing QEMU failed:\n{exc}", pytrace=False)


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

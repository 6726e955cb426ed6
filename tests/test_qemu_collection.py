"""Every QEMU test runs on a fresh machine: a test marked ``qemu`` that would skip because QEMU is
not installed *yet* (a collection-time ``skipif``) is refused; the real collection obeys."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from . import conftest

ROOT = Path(__file__).resolve().parents[1]


class _Item:
    def __init__(self, fixtures: tuple[str, ...], markers: tuple[str, ...]) -> None:
        self.nodeid = "tests/x.py::test_x"
        self.fixturenames = list(fixtures)
        self._markers = markers

    def get_closest_marker(self, name: str) -> Any:
        return object() if name in self._markers else None


@pytest.mark.parametrize(
    ("fixtures", "markers", "refused"),
    [
        (("tmp_path",), ("qemu", "skipif"), True),
        (("tmp_path",), ("qemu",), True),
        (("qemu_binary",), ("qemu", "skipif"), True),
        (("qemu_binary", "tmp_path"), ("qemu",), False),
        (("guest_image",), ("qemu",), False),
        (("tmp_path",), ("skipif",), False),
    ],
)
def test_qemu_tests_must_get_qemu_from_a_fixture_that_installs_it(
    fixtures: tuple[str, ...], markers: tuple[str, ...], refused: bool
) -> None:
    items: Any = [_Item(fixtures, markers)]
    if refused:
        with pytest.raises(pytest.UsageError, match="request the qemu_binary or guest_image"):
            conftest.pytest_collection_modifyitems(items)
    else:
        conftest.pytest_collection_modifyitems(items)


def test_every_qemu_test_of_the_repository_is_collected_with_its_fixture() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
         "-m", "qemu", "tests", "plugins"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tests/qemu/test_vhost_user_realize.py::test_real_qemu_realizes_against_the_backend" \
        in proc.stdout

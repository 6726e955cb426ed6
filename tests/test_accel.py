"""The optional C accelerators: loading them, the switch that turns them off, and their status."""

from __future__ import annotations

import importlib
import re
import shutil
from pathlib import Path

import pytest

from devicehost import accel

RING = "devicehost.vmbus._ringc"


def built(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("switch", [None, "1"])
def test_an_unknown_accelerator_is_refused(monkeypatch: pytest.MonkeyPatch,
                                           switch: str | None) -> None:
    if switch is None:
        monkeypatch.delenv(accel.PURE_PYTHON_ENV, raising=False)
    else:
        monkeypatch.setenv(accel.PURE_PYTHON_ENV, switch)
    with pytest.raises(ValueError, match=re.escape("unknown accelerator 'devicehost.vmbus._nope'")):
        accel.load("devicehost.vmbus._nope")


@pytest.mark.parametrize("value", ["1", "yes", "true", " "])
def test_the_switch_turns_every_accelerator_off(monkeypatch: pytest.MonkeyPatch,
                                                value: str) -> None:
    monkeypatch.setenv(accel.PURE_PYTHON_ENV, value)
    assert accel.load(RING) is None
    assert accel.status() == dict.fromkeys(accel.ACCELERATORS, "turned off")


@pytest.mark.parametrize("value", [None, "", "0"])
def test_unset_empty_or_zero_leaves_accelerators_on(monkeypatch: pytest.MonkeyPatch,
                                                    value: str | None) -> None:
    if value is None:
        monkeypatch.delenv(accel.PURE_PYTHON_ENV, raising=False)
    else:
        monkeypatch.setenv(accel.PURE_PYTHON_ENV, value)
    module = accel.load(RING)
    if built(RING):
        assert module is not None and module.__name__ == RING and hasattr(module, "Ring")
        assert accel.status()[RING] == "in use"
    else:
        assert module is None
        assert accel.status()[RING] == "not built"


def test_an_accelerator_that_fails_to_import_is_not_built(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(accel.PURE_PYTHON_ENV, raising=False)
    missing = "devicehost.vmbus._never_built_for_tests"
    monkeypatch.setitem(accel.ACCELERATORS, missing, "nothing")
    assert accel.load(missing) is None
    status = accel.status()
    assert status[missing] == "not built"
    assert set(status) == {*accel.ACCELERATORS}
    assert missing in status
    assert set(status.values()) <= {"in use", "not built"}


@pytest.mark.parametrize("name", sorted(accel.ACCELERATORS))
def test_every_accelerator_is_built_wherever_a_compiler_is(name: str) -> None:
    """Fails when a C compiler exists but an optional build failed silently (setup.py)."""
    if accel.status()[name] == "turned off":
        pytest.skip(f"{accel.PURE_PYTHON_ENV} turns the accelerators off")
    if shutil.which("cc") is None:
        pytest.skip("no C compiler: the pure-Python paths are expected")
    assert accel.status()[name] == "in use", (
        f"a C compiler exists but {name} is not built: see the output of `pip install -e .`")


def test_every_registered_accelerator_has_a_source_file_built_by_setup_py() -> None:
    setup = (Path(__file__).parents[1] / "setup.py").read_text()
    for name in accel.ACCELERATORS:
        source = "host/" + name.replace(".", "/") + ".c"
        assert (Path(__file__).parents[1] / source).is_file(), source
        assert f'"{name}"' in setup and f'"{source}"' in setup, name

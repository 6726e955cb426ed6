"""Shared fixtures of the host tests: the anyio backend and throwaway third-party plugins."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

# Imported up front: ``fake_site`` narrows sys.path to a directory of fake distributions, and the
# plugins installed there import these.
import anyio  # noqa: F401
import attrs  # noqa: F401
import importlib_metadata  # noqa: F401
import pluggy  # noqa: F401
import pytest

import devicehost
import devicehost.context
import devicehost.fdlimit  # before fake_site: doctor imports it, it imports resource
import devicehost.hookspecs
import devicehost.lifecycle


def _load_builder() -> ModuleType:
    name = "devicehost_tests_thirdparty_builder"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).parent / "thirdparty" / "builder.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


#: The fixtures that provide QEMU, installing it on a fresh machine (tests/qemu/conftest.py).
QEMU_FIXTURES = frozenset({"qemu_binary", "guest_image"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test marked ``qemu`` must get QEMU from a fixture that installs it: a ``skipif`` on the
    binary is evaluated at collection, before anything installs QEMU, and would skip the test on
    every fresh CI machine."""
    for item in items:
        if item.get_closest_marker("qemu") is None:
            continue
        names = set(getattr(item, "fixturenames", ()))
        if not names & QEMU_FIXTURES or item.get_closest_marker("skipif") is not None:
            raise pytest.UsageError(
                f"{item.nodeid} is marked qemu: request the qemu_binary or guest_image fixture"
                " (tests/qemu) instead of skipping when QEMU is not installed yet")


def _implementations(name: str, module: str, attr: str, what: str) -> Any:
    """A module-scoped fixture ``name`` that runs a test module twice: on the C accelerator
    ``module.attr`` (skipped when it is not built or turned off) and on pure Python (the
    attribute patched to None). Use it with ``pytestmark = pytest.mark.usefixtures(name)``."""

    @pytest.fixture(name=name, scope="module", params=["c", "python"])
    def implementation(request: pytest.FixtureRequest) -> Iterator[str]:
        target = importlib.import_module(module)
        if request.param == "c" and getattr(target, attr) is None:
            pytest.skip(f"{what} is not built (or is turned off)")
        with pytest.MonkeyPatch.context() as patch:
            if request.param == "python":
                patch.setattr(target, attr, None)
            yield str(request.param)

    return implementation


ring_implementation = _implementations(
    "ring_implementation", "devicehost.vmbus.ringcontrol", "_ringc", "the C ring accelerator")
queue_implementation = _implementations(
    "queue_implementation", "devicehost.virtio.queue", "_queuec",
    "the C virtqueue accelerator")
driver_implementation = _implementations(
    "driver_implementation", "devicehost.virtio.driverqueue", "_driverc",
    "the C driver accelerator")


@pytest.fixture(scope="session")
def thirdparty() -> ModuleType:
    """tests/thirdparty/builder.py: throwaway plugin distributions (``CATALOG``, builders)."""
    return _load_builder()


def _forget_throwaway_modules() -> None:
    for name in [n for n in sys.modules if n.startswith("dh_")]:
        del sys.modules[name]


SELECTION_VARIABLES = (
    "DEVICEHOST_LOAD_PLUGINS",
    "DEVICEHOST_DISABLE_PLUGIN_AUTOLOAD",
    "DEVICEHOST_TRACE",
)


class FakeSite:
    """A site-packages directory that is the only place distributions are found."""

    def __init__(self, root: Path, builder: ModuleType) -> None:
        self.root = root
        self.builder = builder

    def install(self, *dists: Any) -> None:
        for dist in dists:
            self.builder.write_installed(self.root, dist)

    def install_catalog(self, *roles: str) -> None:
        self.install(*(self.builder.CATALOG[r] for r in roles))


@pytest.fixture
def fake_site(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, thirdparty: ModuleType
) -> Iterator[FakeSite]:
    """Only the distributions installed into this fixture are visible (the shipped plugins are
    not), and the plugin-selection environment variables are unset."""
    root = tmp_path / "site-packages"
    root.mkdir()
    paths = sysconfig.get_paths()
    host_dir = str(Path(devicehost.__file__).parent.parent)
    stdlib = [paths["stdlib"], paths["platstdlib"], str(Path(paths["platstdlib"]) / "lib-dynload")]
    monkeypatch.setattr(sys, "path", [str(root), *stdlib, host_dir])
    for var in SELECTION_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    _forget_throwaway_modules()
    importlib.invalidate_caches()
    yield FakeSite(root, thirdparty)
    _forget_throwaway_modules()


@pytest.fixture(scope="session")
def plugin_venv(tmp_path_factory: pytest.TempPathFactory, thirdparty: ModuleType) -> Path:
    """A virtual environment holding the host and every throwaway plugin of ``CATALOG``,
    installed with pip from wheels built in the test (see tests/thirdparty/builder.py);
    returns its python. Shared by the whole session: it takes a few seconds to build."""
    root = tmp_path_factory.mktemp("plugin-venv")
    python: Path = thirdparty.make_venv(root / "venv")
    wheels = [thirdparty.build_wheel(d, root) for d in thirdparty.CATALOG.values()]
    thirdparty.install_wheels(python, wheels)
    return python


class BoundedCall:
    """Calls a function that must not block on a FIFO, in a thread bounded by ``timeout``.

    Returns the exception it raised (or None). If the call is still blocked after ``timeout``
    seconds (in ``open()`` of the FIFO, say), the FIFO is opened for writing to release it and
    the test fails: the code under test blocked.
    """

    def __call__(self, func: Any, fifo: Path, timeout: float = 30.0) -> BaseException | None:
        import os
        import threading

        outcome: list[BaseException | None] = []

        def target() -> None:
            try:
                func()
            except BaseException as exc:
                outcome.append(exc)
            else:
                outcome.append(None)

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # releases a reader blocked in open
            os.close(fd)
            thread.join(timeout)
            pytest.fail(f"the call blocked on the FIFO {fifo} for {timeout} seconds")
        return outcome[0]


@pytest.fixture
def call_bounded() -> BoundedCall:
    """See :class:`BoundedCall`."""
    return BoundedCall()

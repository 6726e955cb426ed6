"""Throwaway third-party plugin distributions, for the plugin-discovery tests.

Two ways to install one:

- :func:`write_installed` writes the modules and a ``.dist-info`` directory straight into a
  directory, exactly as an installer lays them out in ``site-packages``. Tests put that directory
  on ``sys.path`` (in-process tests of :mod:`devicehost.plugins` and of the CLI).
- :func:`build_wheel` builds a real wheel (PEP 427: modules, METADATA, WHEEL, entry_points.txt,
  RECORD with hashes) that ``pip`` installs into a virtual environment made by :func:`make_venv`.

Why this venv recipe (the fastest reliable one): ``python -m venv --without-pip`` takes ~50 ms.
The venv then gets a symlink to every entry of the running interpreter's ``site-packages``
except the installed device plugins (anything named ``*devicehost_*``), so it has the host checkout
(the same install, editable or not), its dependencies and pip, but none of the shipped plugins;
it needs no network and no build backend. The throwaway wheels are built here in-process (the
project's setuptools is too old to build wheels without the ``wheel`` package, and a build backend
is not what is under test), and installed with one ``pip install --no-deps --no-index`` run.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "API_V1",
    "CATALOG",
    "TICKER",
    "VSTREAM",
    "Dist",
    "build_wheel",
    "install_wheels",
    "make_venv",
    "write_installed",
]

SRC = Path(__file__).parent / "src"
API_V1 = "devicehost:HOST_API_V1"


@dataclass(frozen=True)
class Dist:
    """A distribution: ``modules`` maps module names to source text (default: ``src/<m>.py``)."""

    name: str
    version: str
    modules: dict[str, str | None]
    entry_points: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def normalised(self) -> str:
        return re.sub(r"[-_.]+", "_", self.name).lower()

    def files(self) -> dict[str, bytes]:
        """Every file of the installed distribution, by path relative to site-packages."""
        out: dict[str, bytes] = {}
        for module, source in self.modules.items():
            text = source if source is not None else (SRC / f"{module}.py").read_text()
            out[f"{module}.py"] = text.encode()
        info = f"{self.normalised}-{self.version}.dist-info"
        out[f"{info}/METADATA"] = (
            f"Metadata-Version: 2.1\nName: {self.name}\nVersion: {self.version}\n"
        ).encode()
        lines: list[str] = []
        for group, eps in self.entry_points.items():
            lines.append(f"[{group}]")
            lines += [f"{name} = {value}" for name, value in eps.items()]
            lines.append("")
        out[f"{info}/entry_points.txt"] = "\n".join(lines).encode()
        return out


def device_dist(
    dist: str, module: str, ep_name: str, obj: str, api: str | None = API_V1, version: str = "1.0"
) -> Dist:
    """A distribution with one plugin entry point (and its host-API declaration, unless None)."""
    eps = {"devicehost": {ep_name: f"{module}:{obj}" if obj else module}}
    if api is not None:
        eps["devicehost.api"] = {ep_name: api}
    return Dist(dist, version, {module: None}, eps)


#: The throwaway plugins of the discovery tests, by role.
CATALOG: dict[str, Dist] = {
    "good": device_dist("dh-good", "dh_good", "good", "GoodDevice", version="1.2.0"),
    "broken": device_dist("dh-broken", "dh_broken", "broken", "Broken"),
    "badhook": device_dist("dh-badhook", "dh_badhook", "badhook", "BadHookDevice"),
    "clash_a": device_dist("dh-clash-a", "dh_clash_a", "clash", "ClashDevice"),
    "clash_b": device_dist("dh-clash-b", "dh_clash_b", "clash", "ClashDevice", version="2.0"),
    "future": device_dist(
        "dh-future", "dh_future", "future", "FutureDevice", api="devicehost:HOST_API_V2"
    ),
    "counter": device_dist("dh-counter", "dh_counter", "counter", ""),
}

#: The serviceable device of the live-servicing tests and benchmark (not in CATALOG, whose
#: members the discovery tests install all together).
TICKER: Dist = device_dist("dh-ticker", "dh_ticker", "ticker", "TickerDevice")
#: The serviceable virtio device of the vhost-user handover tests (not in CATALOG either).
VSTREAM: Dist = device_dist("dh-vstream", "dh_vstream", "vstream", "VstreamDevice")


def write_installed(root: Path, dist: Dist) -> None:
    """Lay ``dist`` out in ``root`` as an installer would in site-packages."""
    for rel, data in dist.files().items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def build_wheel(dist: Dist, dest: Path) -> Path:
    """Build ``dist`` as a pure-Python wheel in ``dest``."""
    files = dist.files()
    info = f"{dist.normalised}-{dist.version}.dist-info"
    files[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: devicehost-tests\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n"
    )
    record = []
    for rel, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{rel},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = dest / f"{dist.normalised}-{dist.version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for rel, data in files.items():
            zf.writestr(rel, data)
    return wheel


def make_venv(dest: Path) -> Path:
    """A venv with the host and its dependencies but no device plugin; returns its python."""
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True, timeout=120
    )
    python = dest / "bin" / "python"
    target = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True, timeout=60,
        ).stdout.strip()
    )
    source = Path(sysconfig.get_paths()["purelib"])
    for entry in source.iterdir():
        if "devicehost_" in entry.name or entry.name == "__pycache__":
            continue
        os.symlink(entry, target / entry.name)
    return python


def install_wheels(python: Path, wheels: list[Path]) -> None:
    """``pip install`` the wheels into the venv of ``python``, offline and without deps."""
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--disable-pip-version-check", *map(str, wheels)],
        check=True, timeout=300,
    )

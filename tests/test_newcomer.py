"""The newcomer's path, followed literally in a fresh virtual environment.

1. The README's first command: make a venv, ``pip install -r requirements.txt``, run
   ``devicehost demo`` — it must exit 0 with every shipped device reporting PASS.
2. The device-writing guide: install ``examples/devicehost-entropy`` and ``devicehost[testing]``
   into that venv with the guide's command, see it in ``devicehost list --load --json`` as loaded,
   and run its own tests (the conformance suite) there.

This installs from the package index like a newcomer would (dependencies, the build backend),
so it takes a minute; it is marked slow and runs in CI.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

pytestmark = pytest.mark.slow


def _readme_demo_command() -> str:
    blocks: list[str] = re.findall(r"```sh\n(.*?)```", README.read_text(), re.DOTALL)
    for block in blocks:
        for line in block.splitlines():
            if line.strip().endswith("devicehost demo"):
                return line.strip()
    raise AssertionError("the README has no command that runs devicehost demo")


def _run(cmd: str | list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEVICEHOST_", "PYTHON"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return subprocess.run(
        cmd, cwd=cwd, shell=isinstance(cmd, str), capture_output=True, text=True,
        timeout=timeout, env=env,
    )


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the repository's sources (no venv, no build output), as a fresh clone has."""
    dest = tmp_path_factory.mktemp("newcomer") / "devicehost"
    ignore = shutil.ignore_patterns(
        ".venv", ".git", "__pycache__", "*.egg-info", ".pytest_cache", ".mypy_cache",
        ".ruff_cache", ".hypothesis", "build", "dist",
    )
    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


@pytest.fixture(scope="module")
def demo_run(checkout: Path) -> subprocess.CompletedProcess[str]:
    command = _readme_demo_command()
    assert command.startswith("python3 -m venv .venv"), command
    # The same command, with this interpreter standing in for "python3" (a 3.11+ Python).
    command = command.replace("python3", shlex.quote(sys.executable), 1)
    return _run(command, checkout)


def test_readme_demo_command_passes_every_device(
    demo_run: subprocess.CompletedProcess[str],
) -> None:
    out = demo_run.stdout
    assert demo_run.returncode == 0, f"stdout:\n{out}\nstderr:\n{demo_run.stderr[-4000:]}"
    for device in ("vmbfs", "intercept", "vsock", "sidecar"):
        block = out.split(f"== {device}\n", 1)[1].split("\n== ", 1)[0]
        assert "result: PASS" in block, f"{device} did not pass:\n{block}"
    assert "4 of 4 device demos passed" in out


def test_the_guide_example_installs_is_listed_and_passes_its_tests(
    demo_run: subprocess.CompletedProcess[str], checkout: Path
) -> None:
    assert demo_run.returncode == 0, "the venv from the README command is needed"
    bin_dir = checkout / ".venv" / "bin"
    guide = (checkout / "docs" / "writing-a-device.md").read_text()
    (install_line,) = [line for line in guide.splitlines() if line.startswith("pip install ./")]
    (list_line,) = [line for line in guide.splitlines() if line.startswith("devicehost list ")]
    # The guide's commands, with the example's path in this checkout.
    install_args = shlex.split(install_line.replace("./devicehost-entropy",
                                                    "./examples/devicehost-entropy"))
    assert install_args[2:] == ["./examples/devicehost-entropy", "devicehost[testing]"]
    install = _run([str(bin_dir / "pip"), "install", "-q", *install_args[2:]], checkout)
    assert install.returncode == 0, install.stderr[-4000:]
    list_args = shlex.split(list_line.split("#")[0])
    assert list_args == ["devicehost", "list", "--load", "--json"]
    listed = _run([str(bin_dir / "devicehost"), *list_args[1:]], checkout)
    assert listed.returncode == 0, listed.stderr
    plugins = {p["name"]: p for p in json.loads(listed.stdout)}
    assert plugins["entropy"]["status"] == "loaded"
    assert plugins["entropy"]["distribution"] == "devicehost-entropy"
    tests = _run(
        [str(bin_dir / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "examples/devicehost-entropy/tests"],
        checkout,
    )
    assert tests.returncode == 0, tests.stdout[-4000:] + tests.stderr[-2000:]
    summary = tests.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    # The example's own tests plus the conformance suite on two backends: all of them ran.
    assert passed and int(passed.group(1)) >= 11 and "failed" not in summary, summary

"""The documentation matches the code: every hook documented with its exact signature, and the
guide's code is the example plugin's code, which runs as tests."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from devicehost import hookspecs

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "writing-a-device.md"
EXAMPLE = ROOT / "examples" / "devicehost-entropy"
HOOKS = [name for name in hookspecs.__all__ if name != "hookspec"]


def _heading(name: str) -> str:
    signature = str(inspect.signature(getattr(hookspecs, name))).replace("'", "")
    return f"### `{name}{signature}`"


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_is_documented_with_its_exact_signature(name: str) -> None:
    text = GUIDE.read_text()
    heading = _heading(name)
    assert heading in text, f"docs/writing-a-device.md lacks {heading!r}"
    section = text.split(heading, 1)[1].split("\n### ", 1)[0]
    firstresult = getattr(hookspecs, name).devicehost_spec["firstresult"]
    assert ("*First result.*" in section) == firstresult


def test_the_guide_documents_no_hook_that_does_not_exist() -> None:
    documented = re.findall(r"^### `(\w+)\(", GUIDE.read_text(), re.MULTILINE)
    assert sorted(documented) == sorted(HOOKS)


@pytest.mark.parametrize(
    "relative",
    ["pyproject.toml", "devicehost_entropy/__init__.py", "tests/test_entropy.py"],
)
def test_the_guide_shows_the_example_exactly(relative: str) -> None:
    source = (EXAMPLE / relative).read_text().strip()
    assert source in GUIDE.read_text(), f"the guide's copy of {relative} is out of date"


def test_every_hook_spec_follows_the_docstring_template() -> None:
    for name in HOOKS:
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        params = list(inspect.signature(getattr(hookspecs, name)).parameters)
        for param in params:
            assert f":param {param}:" in doc, f"{name}: no :param {param}:"
        assert "Called " in doc, f"{name}: the docstring does not say when it is called"
        if getattr(hookspecs, name).devicehost_spec["firstresult"]:
            assert "Stops at first non-None result." in doc
            assert ":returns:" in doc

"""Fixtures shared by the VMBus tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devicehost.vmbus import ringcontrol as ring_module


@pytest.fixture(scope="module", params=["c", "python"])
def ring_implementation(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a module's tests on the C ring accelerator and on the pure-Python ring (use it with
    ``pytestmark = pytest.mark.usefixtures("ring_implementation")``)."""
    if request.param == "c" and ring_module._ringc is None:
        pytest.skip("the C ring accelerator is not built (or is turned off)")
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "python":
            patch.setattr(ring_module, "_ringc", None)
        yield str(request.param)

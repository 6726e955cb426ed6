"""Project-wide pytest configuration.

Async tests run on asyncio by default; the device conformance suite (devicehost.testing) and the
host tests that matter on both backends parametrize ``anyio_backend`` over asyncio and trio
themselves.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"

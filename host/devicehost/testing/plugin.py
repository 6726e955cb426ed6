"""The devicehost pytest plugin (entry point ``pytest11``): fixtures for device authors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from devicehost.testing.registry import host_with

__all__ = ["devicehost_host"]


@pytest.fixture
def devicehost_host() -> Callable[..., Any]:
    """A factory for hosts serving device classes given directly (nothing installed).

    Use it as ``async with devicehost_host({"echo": EchoDevice}) as host: ...``.
    """
    return host_with

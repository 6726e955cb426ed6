"""A cross-cutting third-party plugin (a module): counts the offers of every device."""

from collections.abc import Generator
from typing import Any

from devicehost import hookimpl

OFFERS: list[str] = []


@hookimpl(wrapper=True)
def offer(ctx: Any) -> Generator[None, Any, Any]:
    result = yield
    OFFERS.append(ctx.name)
    return result

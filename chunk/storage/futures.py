"""Done callbacks for futures run in the background, whose awaiter may have moved on."""

from __future__ import annotations

import asyncio

__all__ = ["retrieve"]


def retrieve(fut: asyncio.Future) -> None:
    """Done callback: a background future's failure is retrieved (its awaiter may have given
    up or been cancelled), so asyncio logs no "exception was never retrieved"."""
    if not fut.cancelled():
        fut.exception()

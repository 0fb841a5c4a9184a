"""asyncio helpers the shim's modules share."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any


async def race(*aws: Awaitable[Any]) -> None:
    """Wait until the first of `aws` ends (whatever its outcome), then cancel the others and
    wait for them to end too: nothing is left running, nothing raises from here."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

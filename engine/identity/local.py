"""The demo's provider: the public address is a loopback address; nothing on the machine changes.

Holding the identity means answering on it, so only the active's responder is bound. A frozen
old active keeps its socket bound; the new active retries until it is released, and never
binds beside it (no SO_REUSEPORT), so two nodes never answer at once.
"""
from __future__ import annotations

import asyncio

from engine.identity import IdentityProvider

RETRY = 0.1


class LocalIdentity(IdentityProvider):
    async def take(self, epoch: int) -> None:
        while True:
            try:
                await self._serve(epoch)
                return
            except OSError:
                await self._stop_serving()
                await asyncio.sleep(RETRY)

    async def release(self) -> None:
        await self._stop_serving()

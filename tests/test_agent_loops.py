"""The agent's own loops, run on a stand-in for the agent: only what each loop touches."""
from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

from engine.agent import Agent


class RecordingLink:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send_now(self, type_: str, fields: dict[str, Any]) -> None:
        assert type_ == "hb"
        self.sent.append(fields)

    def close(self) -> None:
        raise AssertionError("the link is fine")


def test_heartbeats_go_on_when_their_fields_cannot_be_read() -> None:
    """A heartbeat loop that died of one failed status read left its node silent for good:
    seen on a passive whose receive queue emptied under the read, and on an active it would
    make the passives take over."""
    calls = 0

    def fields() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls in (2, 3):
            raise TypeError("cannot unpack non-iterable NoneType object")
        return {"role": "passive", "n": calls}

    link = RecordingLink()
    agent = SimpleNamespace(cluster=SimpleNamespace(heartbeat=SimpleNamespace(interval=0.01)),
                            _heartbeat_fields=fields, channel=SimpleNamespace(links={"primary": link}),
                            last_error="")

    async def run() -> None:
        loop = asyncio.ensure_future(Agent._heartbeat_loop(agent))  # type: ignore[arg-type]
        deadline = time.monotonic() + 10
        while len(link.sent) < 6 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)

    asyncio.run(run())
    assert [f["n"] for f in link.sent[:6]] == [1, 1, 1, 4, 5, 6]
    assert "heartbeat: TypeError" in agent.last_error


def test_a_peer_whose_frames_keep_arriving_is_not_silent_while_its_heartbeat_waits_behind_records() -> None:
    """A passive queues each batch of records before it reads the next frame; a heartbeat behind
    32 MiB of them, on a slow disk, was handled a second after it arrived."""
    now = time.time()
    link = SimpleNamespace(stream=SimpleNamespace(last_arrival=now - 0.1))
    agent = SimpleNamespace(views={"primary": {"seen": now - 1.5}, "tertiary": {"seen": now - 0.2}},
                            channel=SimpleNamespace(links={"primary": link}))
    assert Agent._heard_at(agent, "primary") == now - 0.1  # type: ignore[arg-type]
    assert Agent._heard_at(agent, "tertiary") == now - 0.2  # type: ignore[arg-type]  # no link: its heartbeat
    assert Agent._heard_at(agent, "secondary") is None  # type: ignore[arg-type]

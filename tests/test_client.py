"""The engine's client: a kept connection serves many requests and survives an agent restart."""
from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from engine.client import Connection
from engine.errors import AgentUnreachable, ApiError


@contextmanager
def agent_like(path: Path) -> Iterator[dict[str, object]]:
    """A JSON-lines server on `path` answering each request with its connection's number;
    `state["drop"]()` closes every open connection, as an agent restart does."""
    state: dict[str, object] = {"connections": 0}
    loop = asyncio.new_event_loop()
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state["connections"] = number = int(state["connections"]) + 1  # type: ignore[arg-type]
        writers.append(writer)
        while line := await reader.readline():
            op = json.loads(line)["op"]
            answer = ({"ok": True, "result": number} if op == "which" else
                      {"ok": False, "error": {"code": "bad", "message": f"op: no such op {op}", "hint": "try which"}})
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        writer.close()

    server = loop.run_until_complete(asyncio.start_unix_server(serve, path=str(path)))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def drop() -> None:
        def close_all() -> None:
            for w in writers:
                w.close()
        loop.call_soon_threadsafe(close_all)

    state["drop"] = drop
    try:
        yield state
    finally:
        async def shutdown() -> None:
            server.close()
            for w in writers:
                w.close()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in others:
                t.cancel()
            await asyncio.gather(*others, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_many_requests_travel_on_one_connection_and_a_dropped_one_is_replaced(tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    with agent_like(sock) as state, Connection(sock, timeout=5) as conn:
        assert [conn.request("which") for _ in range(5)] == [1] * 5
        state["drop"]()  # type: ignore[operator]
        assert conn.request("which") == 2, "a request after the agent closed the connection failed"
        assert conn.request("which") == 2
        with pytest.raises(ApiError, match="no such op") as err:
            conn.request("nonsense")
        assert err.value.hint == "try which"
        assert conn.request("which") == 2, "an error answer broke the connection"


def test_no_agent_is_reported_as_unreachable(tmp_path: Path) -> None:
    with pytest.raises(AgentUnreachable, match="agent socket"):
        Connection(tmp_path / "nothing.sock", timeout=1).request("status")

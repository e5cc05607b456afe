"""The management API: JSON lines over the agent's Unix socket.

The socket is created mode 0600 inside the 0700 state directory, and every connection is
checked with SO_PEERCRED: only root and the agent's own user are served. One request per line
`{"op": ..., ...}`; one answer per line, `{"ok": true, "result": ...}` or
`{"ok": false, "error": {"code", "message", "hint"}}`.

A client sends its next request only after the answer to the last. Long work that may be
given up (a verify) is named in `hangup_cancels`: when its client hangs up before the answer
(an operator's Ctrl-C), the work is cancelled rather than left running for hours.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from engine.errors import ApiError, NfError

log = logging.getLogger("nf.api")

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
MAX_REQUEST = 1 << 20


class ApiServer:
    def __init__(self, path: Path, handlers: dict[str, Handler], *, hangup_cancels: frozenset[str] = frozenset()) -> None:
        self.path = path
        self.handlers = handlers
        self.hangup_cancels = hangup_cancels
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_REQUEST)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self._server:
            self._server.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if not _peer_allowed(sock):
            writer.write(_line({"ok": False, "error": {"code": "forbidden", "message": "peer uid not allowed",
                                                       "hint": "run nf as root or as the agent's user"}}))
            writer.close()
            return
        try:
            while line := await reader.readline():
                answer = await self._answer(line, reader)
                if answer is None:
                    break  # the client hung up
                writer.write(_line(answer))
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()

    async def _answer(self, line: bytes, reader: asyncio.StreamReader) -> dict[str, Any] | None:
        """The answer to one request line; None when its client hung up first and the work was
        cancelled (only for the ops in `hangup_cancels`)."""
        if _op(line) not in self.hangup_cancels:
            return await self._handle(line)
        work = asyncio.ensure_future(self._handle(line))
        hangup = asyncio.ensure_future(reader.read(1))  # anything before the answer is a hang-up
        try:
            await asyncio.wait({work, hangup}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (work, hangup):
                if not task.done():
                    task.cancel()
            await asyncio.gather(work, hangup, return_exceptions=True)
        if work.cancelled():
            log.info("request cancelled: its client hung up")
            return None
        return work.result()

    async def _handle(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ApiError("request: expected a JSON object", field="request")
            op = request.get("op")
            handler = self.handlers.get(op) if isinstance(op, str) else None
            if handler is None:
                raise ApiError(f"op: expected one of {', '.join(sorted(self.handlers))}, got {op!r}", field="op")
            return {"ok": True, "result": await handler(request)}
        except json.JSONDecodeError as exc:
            return {"ok": False, "error": ApiError(f"request: not JSON ({exc})", field="request").to_json()}
        except NfError as exc:
            return {"ok": False, "error": exc.to_json()}
        except Exception as exc:  # an agent bug must not kill the API
            log.exception("api request failed")
            return {"ok": False, "error": {"code": "internal", "message": f"{type(exc).__name__}: {exc}",
                                           "hint": "see the agent's log"}}


def _peer_allowed(sock: socket.socket | None) -> bool:
    if sock is None:
        return False
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (0, os.getuid())


def _op(line: bytes) -> str | None:
    try:
        request = json.loads(line)
    except ValueError:
        return None  # refused with its reason by _handle
    op = request.get("op") if isinstance(request, dict) else None
    return op if isinstance(op, str) else None


def _line(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"

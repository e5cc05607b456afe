"""Channel framing: one message = a JSON header plus an optional binary payload.

Wire format of a frame::

    u32 frame_len | u8 flags | u32 header_len | header (UTF-8 JSON) | payload

`frame_len` counts everything after itself and is checked against the limit *before*
anything is read, so a hostile or broken peer cannot make us allocate without bound.
Bit 0 of `flags` marks a zstd-compressed payload. Every header carries `t` (the message
type) and `epoch` (the sender's epoch: the fencing token).
"""
from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any

import zstandard

from engine.errors import FrameTooLarge, ProtocolError

FLAG_ZSTD = 0x01
_HEAD = struct.Struct(">IBI")
HEADER_MAX = 1 << 20
MIN_COMPRESS = 512
SAMPLE = 64 << 10
#: An uncompressed payload of at least ALIGN_FROM bytes starts at a multiple of PAYLOAD_ALIGN in
#: the frame's body (see `Codec.frame`).
PAYLOAD_ALIGN = 4096
ALIGN_FROM = 1 << 20

Buffer = bytes | bytearray | memoryview


@dataclass
class Message:
    """A decoded frame."""

    type: str
    epoch: int
    fields: dict[str, Any] = field(default_factory=dict)
    payload: Buffer = b""

    def get(self, name: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
        """A header field of the expected type, or a ProtocolError naming it."""
        if name not in self.fields:
            if optional:
                return None
            raise ProtocolError(f"{self.type}.{name}: missing")
        value = self.fields[name]
        if optional and value is None:
            return None
        if isinstance(value, bool) and kind is int:
            raise ProtocolError(f"{self.type}.{name}: expected int, got bool")
        if not isinstance(value, kind):
            raise ProtocolError(f"{self.type}.{name}: expected {_kind_name(kind)}, got {type(value).__name__}")
        return value


class Codec:
    """Encodes and decodes frames with one compression setting and one size limit."""

    def __init__(self, *, max_frame: int, compression: str = "zstd", level: int = 3) -> None:
        self.max_frame = max_frame
        self.compress = compression == "zstd"
        self._cctx = zstandard.ZstdCompressor(level=level)
        self._dctx = zstandard.ZstdDecompressor()

    def encode(self, type_: str, epoch: int, fields: dict[str, Any] | None = None, payload: bytes = b"") -> bytes:
        """One frame as a single bytes object."""
        return b"".join(self.frame(type_, epoch, fields, [payload]))

    def frame(self, type_: str, epoch: int, fields: dict[str, Any] | None, parts: Sequence[Buffer]) -> list[Buffer]:
        """One frame as a list of buffers, the payload being `parts` in order.

        The parts are not joined unless they are compressed: a batch of file data goes to the
        TLS writer without another copy.
        """
        header = dict(fields or {})
        header["t"] = type_
        header["epoch"] = epoch
        raw_header = json.dumps(header, separators=(",", ":")).encode()
        if len(raw_header) > HEADER_MAX:
            raise FrameTooLarge(f"{type_} header of {len(raw_header)} bytes exceeds the limit of {HEADER_MAX}")
        size = sum(len(p) for p in parts)
        flags = 0
        if self.compress and size >= MIN_COMPRESS and self._worth_compressing(parts):
            packed = self._cctx.compress(b"".join(parts))
            if len(packed) < size:
                parts, size, flags = [packed], len(packed), FLAG_ZSTD
        if not flags and size >= ALIGN_FROM:
            # Pad the header (JSON allows trailing blanks) so the payload starts on a page of
            # the receiver's page-aligned body buffer: its data is then written to disk as it is.
            pad = -(5 + len(raw_header)) % PAYLOAD_ALIGN
            if len(raw_header) + pad <= HEADER_MAX:
                raw_header += b" " * pad
        frame_len = 1 + 4 + len(raw_header) + size
        if frame_len > self.max_frame + HEADER_MAX:
            raise FrameTooLarge(f"frame of {frame_len} bytes exceeds the limit of {self.max_frame}")
        return [_HEAD.pack(frame_len, flags, len(raw_header)) + raw_header, *parts]

    def check_frame_length(self, frame_len: int) -> None:
        """Refuse a frame length before anything of the frame is read or allocated."""
        if frame_len > self.max_frame + HEADER_MAX or frame_len < 5:
            raise ProtocolError(f"frame length {frame_len} outside 5..{self.max_frame + HEADER_MAX}")

    def _worth_compressing(self, parts: Sequence[Buffer]) -> bool:
        """Sample large payloads first: compressing incompressible megabytes only burns CPU."""
        size = sum(len(p) for p in parts)
        if size <= SAMPLE:
            return True
        sample = bytearray()
        for p in parts:
            sample += p[: SAMPLE - len(sample)]
            if len(sample) >= SAMPLE:
                break
        return len(self._cctx.compress(bytes(sample))) < SAMPLE * 0.9

    async def read(self, reader: asyncio.StreamReader) -> Message:
        """Read one frame; raises IncompleteReadError at a clean end of stream."""
        head = await reader.readexactly(4)
        (frame_len,) = struct.unpack(">I", head)
        self.check_frame_length(frame_len)
        body = await reader.readexactly(frame_len)
        return self.decode_body(body)

    def decode_body(self, body: bytes | bytearray | memoryview) -> Message:
        """A frame's body as a Message; the payload is a view of `body`, not a copy."""
        flags = body[0]
        (header_len,) = struct.unpack(">I", body[1:5])
        if header_len > HEADER_MAX or 5 + header_len > len(body):
            raise ProtocolError(f"header length {header_len} invalid")
        try:
            header = json.loads(bytes(body[5 : 5 + header_len]))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProtocolError(f"header is not JSON: {exc}") from None
        if not isinstance(header, dict):
            raise ProtocolError("header: expected a JSON object")
        type_ = header.pop("t", None)
        epoch = header.pop("epoch", None)
        if not isinstance(type_, str):
            raise ProtocolError("t: expected the message type as a string")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ProtocolError(f"{type_}.epoch: expected a non-negative int")
        payload: Buffer = memoryview(body)[5 + header_len :]
        if flags & FLAG_ZSTD:
            try:
                payload = self._dctx.decompress(payload, max_output_size=self.max_frame)
            except zstandard.ZstdError as exc:
                raise ProtocolError(f"{type_}: payload does not decompress: {exc}") from None
            if len(payload) > self.max_frame:
                raise ProtocolError(f"{type_}: payload exceeds {self.max_frame} bytes")
        elif flags & ~FLAG_ZSTD:
            raise ProtocolError(f"{type_}: unknown flags {flags:#x}")
        return Message(type_, epoch, header, payload)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__

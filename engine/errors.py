"""Error types shared by every layer.

Each error carries what an operator needs to act: the field (or file) at fault, what was
expected, and a hint. The CLI turns them into `{"error": {"code", "message", "hint"}}`.
"""
from __future__ import annotations


class NfError(Exception):
    """Base of every error nf raises on purpose."""

    code = "nf_error"

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message, "hint": self.hint}


class ConfigError(NfError):
    """A configuration file is missing, unreadable or has a bad value."""

    code = "config_error"

    def __init__(self, file: str, field: str, expected: str, got: object = None, *, hint: str = "") -> None:
        self.file = str(file)
        self.field = field
        self.expected = expected
        self.got = got
        shown = "" if got is None else f", got {got!r}"
        where = f"{self.file}: {field}" if field else self.file
        super().__init__(f"{where}: expected {expected}{shown}", hint=hint)


class PathError(NfError):
    """A path from the channel or an API is not a safe path inside the protected set."""

    code = "path_refused"

    def __init__(self, path: object, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"path {path!r} refused: {reason}")


class ProtocolError(NfError):
    """A channel message is malformed, too large or out of order."""

    code = "protocol_error"


class FrameTooLarge(ProtocolError):
    """A message to send would pass the frame or header limit that the peer enforces."""


class ChannelAuthError(NfError):
    """A peer did not present a valid certificate of this cluster."""

    code = "channel_auth"


class ApiError(NfError):
    """A management API request was refused; `field` names the bad part of the request."""

    code = "api_error"

    def __init__(self, message: str, *, field: str = "", hint: str = "", code: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.field = field
        if code:
            self.code = code


class AgentUnreachable(NfError):
    """No agent of the cluster answered on its management socket."""

    code = "agent_unreachable"

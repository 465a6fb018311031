"""User-facing errors: the CLI prints their message on one line and exits non-zero.

The body server names every refusal with an `ErrorCode` on the wire; the device raises the matching
`RemoteError` subclass, which the gateway maps to the HTTP status an OpenAI client expects.
"""

from enum import Enum


class LambdaSplitError(Exception):
    """An error whose message tells the user what went wrong and what to do next."""


class UnsupportedArchitectureError(LambdaSplitError):
    """The model's architecture has no split adapter."""


class SplitError(LambdaSplitError):
    """An invalid split point for the model."""


class SourceError(LambdaSplitError):
    """A model source that cannot be found or read."""


class PromptError(LambdaSplitError):
    """An empty prompt, or one that does not fit the context window."""


class WireError(LambdaSplitError):
    """A frame that is malformed, too large, or not what the protocol expects."""


class ErrorCode(str, Enum):
    """The `code` of an ERROR frame: what the device should do about it, in one word."""

    AUTH = "auth"  # token missing or wrong: fix the credentials, do not retry
    CAPACITY = "capacity"  # the server is full right now: retry after `retry_after` seconds
    PROTOCOL = "protocol"  # a malformed or unexpected frame: a bug or a hostile client
    LIMIT = "limit"  # a frame or session over a server limit (batch, context, KV bytes)
    MISMATCH = "mismatch"  # the device's parts do not fit the server's body
    EXPIRED = "expired"  # the session idled past its TTL: reconnect and replay
    COMPUTE = "compute"  # the body failed to run this step (e.g. out of GPU memory)
    UNAVAILABLE = "unavailable"  # device side only: the server cannot be reached


class RemoteError(LambdaSplitError):
    """The body server refused or failed a request; the subclass says which way."""

    code: ErrorCode = ErrorCode.PROTOCOL

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class AuthError(RemoteError):
    code = ErrorCode.AUTH


class CapacityError(RemoteError):
    """The server cannot take another session (or this frame) right now; retry later."""

    code = ErrorCode.CAPACITY


class ProtocolError(RemoteError):
    """The server rejected a frame as malformed, unexpected or over its limits."""

    code = ErrorCode.PROTOCOL


class LimitError(ProtocolError, WireError):
    """A frame or session over one of the server's limits (rows, positions, context, KV bytes); a
    WireError too, since the frame parser raises it."""

    code = ErrorCode.LIMIT


class MismatchError(RemoteError):
    """The device's parts and the server's body are not parts of the same split model."""

    code = ErrorCode.MISMATCH


class ComputeError(RemoteError):
    """The body failed while running a step; the session is closed and can be replayed."""

    code = ErrorCode.COMPUTE


class UnavailableError(RemoteError):
    """The body server cannot be reached (refused, timed out, or lost for longer than the reconnect window)."""

    code = ErrorCode.UNAVAILABLE


class ExpiredError(UnavailableError):
    """The server closed the session after it idled past the TTL."""

    code = ErrorCode.EXPIRED


REMOTE_ERRORS: dict[ErrorCode, type[RemoteError]] = {
    ErrorCode.AUTH: AuthError,
    ErrorCode.CAPACITY: CapacityError,
    ErrorCode.PROTOCOL: ProtocolError,
    ErrorCode.LIMIT: LimitError,
    ErrorCode.MISMATCH: MismatchError,
    ErrorCode.EXPIRED: ExpiredError,
    ErrorCode.COMPUTE: ComputeError,
    ErrorCode.UNAVAILABLE: UnavailableError,
}


def remote_error(code: str, message: str, retry_after: float | None = None) -> RemoteError:
    """The typed error for an ERROR frame's code (unknown codes read as protocol errors)."""
    try:
        cls = REMOTE_ERRORS[ErrorCode(code)]
    except ValueError:
        cls = ProtocolError
    return cls(message, retry_after)

"""The handshake and control messages on top of frames: HELLO, WELCOME and ERROR carry UTF-8 JSON.

Connection: one WebSocket per device at ws[s]://HOST:PORT/v1/body, `Authorization: Bearer TOKEN`.
    device -> HELLO   {"protocol": 1, "manifest": {...}, "codec": "bf16"}
    cloud  -> WELCOME {"protocol": 1, "session": "<32 hex>", "manifest": {...}, "limits": {...}}
              or ERROR {"code": "<ErrorCode>", "message": "...", "retry_after": s?} and the connection closes
    then MASK? HIDDEN -> HIDDEN per step (sequence numbers echoed), RESET between sequences.
    Speculative decoding: CROP {"length": n} drops positions after n; TREE {"parents": [p_0 .. p_(P-1)]}
    before a HIDDEN frame (1, P, D) makes its positions a tree (p_0 = -1, 0 <= p_i < i): position i sits at
    depth(i) past the sequence (depth(0) = 0, depth(i) = depth(p_i) + 1) and attends to the cached
    sequence, its ancestors and itself; all P are cached in frame order, so the device CROPs to the
    accepted prefix. A server that verifies trees says so in WELCOME's limits: "max_tree_positions".
"""

from __future__ import annotations

import json
import math
from typing import Any

from lambdasplit.errors import ErrorCode, WireError, remote_error
from lambdasplit.wire.frame import NO_SESSION, Frame, MsgType

PROTOCOL = 1
BODY_PATH = "/v1/body"
MAX_CONTROL_BYTES = 64 << 10
MAX_CONTROL_DEPTH = 32  # HELLO/WELCOME nest 3 deep; json.loads recurses once per level
MAX_RETRY_AFTER = 3600.0  # a server's retry_after is clamped to this many seconds


def control_frame(type_: MsgType, payload: dict[str, Any], session: bytes = NO_SESSION) -> Frame:
    return Frame(type_, session=session, payload=json.dumps(payload).encode())


def error_frame(code: str, message: str, session: bytes = NO_SESSION, retry_after: float | None = None) -> Frame:
    payload: dict[str, Any] = {"code": code, "message": message}
    if retry_after is not None:
        payload["retry_after"] = retry_after
    return control_frame(MsgType.ERROR, payload, session)


def read_control(frame: Frame, expected: MsgType) -> dict[str, Any]:
    """The JSON of a control frame.

    An ERROR frame from the peer raises the typed `RemoteError` for its code (a `LambdaSplitError`),
    carrying the peer's message and `retry_after`; anything malformed raises `WireError`.
    """
    if frame.type == MsgType.ERROR:
        data = _json(frame)
        code = data.get("code")
        code = code if isinstance(code, str) else ErrorCode.PROTOCOL.value
        message = _one_line(data.get("message")) or "no reason given"
        raise remote_error(code, f"the body server refused: {message} [{_one_line(code)}]", _retry_after(data))
    if frame.type != expected:
        raise WireError(f"expected a {expected.name} frame, got {frame.type.name}")
    return _json(frame)


def _json(frame: Frame) -> dict[str, Any]:
    if len(frame.payload) > MAX_CONTROL_BYTES:
        raise WireError(f"control message too large ({len(frame.payload)} bytes; at most {MAX_CONTROL_BYTES})")
    try:
        text = frame.payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireError(f"control message is not valid UTF-8: {exc}") from None
    depth = _nesting_depth(text)
    if depth > MAX_CONTROL_DEPTH:
        raise WireError(f"control message nested {depth} deep; at most {MAX_CONTROL_DEPTH}")
    try:
        data = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except (json.JSONDecodeError, ValueError, RecursionError, OverflowError) as exc:
        # ValueError: NaN/Infinity, 1e400, integers over Python's digit limit
        raise WireError(f"control message is not valid JSON: {_one_line(str(exc))}") from None
    if not isinstance(data, dict):
        raise WireError("control message must be a JSON object")
    return data


def _nesting_depth(text: str) -> int:
    """The deepest [ / { nesting outside strings (checked before parsing: json recurses per level)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_CONTROL_DEPTH:
                    return deepest
        elif char in "]}":
            depth -= 1
    return deepest


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _retry_after(data: dict[str, Any]) -> float | None:
    value = data.get("retry_after")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:  # an integer too large for a float
        return MAX_RETRY_AFTER
    return min(max(value, 0.0), MAX_RETRY_AFTER) if math.isfinite(value) else None


def _one_line(value: Any, limit: int = 500) -> str:
    """A peer's text for one log/error line: printable, no newlines, bounded."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else repr(value)
    clipped = "".join(c if c.isprintable() else " " for c in text[:limit])
    return clipped + ("..." if len(text) > limit else "")

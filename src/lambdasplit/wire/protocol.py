"""The handshake and control messages on top of frames: HELLO, WELCOME and ERROR carry UTF-8 JSON.

Connection: one WebSocket per device at ws[s]://HOST:PORT/v1/body, `Authorization: Bearer TOKEN`.
    device -> HELLO   {"protocol": 1, "manifest": {...}, "codec": "bf16"}
    cloud  -> WELCOME {"protocol": 1, "session": "<32 hex>", "manifest": {...}, "limits": {...}}
              or ERROR {"code": "...", "message": "..."} and the connection closes
    then MASK? HIDDEN -> HIDDEN per step (sequence numbers echoed), RESET between sequences.
"""

from __future__ import annotations

import json
from typing import Any

from lambdasplit.errors import WireError
from lambdasplit.wire.frame import NO_SESSION, Frame, MsgType

PROTOCOL = 1
BODY_PATH = "/v1/body"
MAX_CONTROL_BYTES = 64 << 10


def control_frame(type_: MsgType, payload: dict[str, Any], session: bytes = NO_SESSION) -> Frame:
    return Frame(type_, session=session, payload=json.dumps(payload).encode())


def error_frame(code: str, message: str, session: bytes = NO_SESSION) -> Frame:
    return control_frame(MsgType.ERROR, {"code": code, "message": message}, session)


def read_control(frame: Frame, expected: MsgType) -> dict[str, Any]:
    """The JSON of a control frame; an ERROR frame from the peer becomes a WireError with its message."""
    if frame.type == MsgType.ERROR:
        data = _json(frame)
        raise WireError(f"the body server refused: {data.get('message', 'no reason given')} [{data.get('code', '?')}]")
    if frame.type != expected:
        raise WireError(f"expected a {expected.name} frame, got {frame.type.name}")
    return _json(frame)


def _json(frame: Frame) -> dict[str, Any]:
    if len(frame.payload) > MAX_CONTROL_BYTES:
        raise WireError("control message too large")
    try:
        data = json.loads(frame.payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"control message is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise WireError("control message must be a JSON object")
    return data

"""The shape check every frame passes before the scheduler queues it.

The parser checks a frame against itself (header, payload length, limits); this checks that the
frame is the kind of thing its type carries, so nothing that reaches the compute thread can fail on
a shape: a HIDDEN frame that came with a JSON payload and no dimensions once passed parsing and
raised IndexError inside the scheduler loop, failing every session of that step. It needs no
session state, so it runs on the caller's thread and a refused frame never enters a queue.
"""

from __future__ import annotations

from lambdasplit.wire.frame import DType, Frame, MsgType

# The ranks a tensor-carrying frame may have; every other type carries JSON or nothing.
TENSOR_RANKS: dict[MsgType, tuple[int, ...]] = {
    MsgType.HIDDEN: (3,),  # (B, T, D)
    MsgType.MASK: (2,),  # (B, T)
    MsgType.TENSOR: (1, 2, 3, 4),  # a diffusion step's tensor
}


def frame_problem(frame: Frame, hidden_size: int | None) -> str | None:
    """Why `frame` cannot be queued for any session (None: its kind and shape are sound).
    `hidden_size` is the hosted body's D, if it takes hidden states."""
    name = frame.type.name
    ranks = TENSOR_RANKS.get(frame.type)
    if ranks is None:
        if frame.dtype != DType.BYTES or frame.shape:
            return f"a {name} frame carries no tensor, got {frame.dtype.name} of shape {frame.shape}"
        return None
    if frame.dtype == DType.BYTES:
        return f"a {name} frame must carry a tensor, got a bytes payload"
    if len(frame.shape) not in ranks:
        want = " or ".join(str(r) for r in ranks)
        return f"a {name} frame must have rank {want}, got shape {frame.shape}"
    if min(frame.shape) < 1:
        return f"{name} frame of shape {frame.shape} has a zero dimension; every dimension must be at least 1"
    if frame.type == MsgType.MASK and frame.dtype != DType.UINT8:
        return f"an attention mask must be uint8, got {frame.dtype.name}"
    if frame.type == MsgType.HIDDEN:
        if frame.dtype == DType.UINT8:
            return "hidden states must be floating point (fp32, bf16 or fp16)"
        if hidden_size is not None and frame.shape[2] != hidden_size:
            return f"hidden size {frame.shape[2]} does not match the model's D = {hidden_size}"
    return None

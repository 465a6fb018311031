"""BodySession: one device's body state (KV cache, mask history), driven by frames.

It knows tensors and frames but nothing of sockets, so the same session serves the in-process body
and the network server.
"""

from __future__ import annotations

import torch

from lambdasplit.errors import WireError
from lambdasplit.split.parts import PartRunner
from lambdasplit.wire.frame import Frame, MsgType, tensor_frame


class BodySession:
    """Runs the body on HIDDEN frames, appending to this session's own KV cache."""

    def __init__(self, runner: PartRunner, session_id: bytes, max_context: int | None = None) -> None:
        self.runner = runner
        self.session_id = session_id
        self.max_context = max_context
        self._pending_mask: torch.Tensor | None = None
        self.tokens = 0

    def handle(self, frame: Frame) -> Frame | None:
        """Consume one frame; return the reply frame, if the message has one."""
        if frame.type == MsgType.RESET:
            self.runner.reset()
            self._pending_mask = None
            return None
        if frame.type == MsgType.MASK:
            self._pending_mask = frame.tensor()
            return None
        if frame.type == MsgType.HIDDEN:
            return self._forward(frame)
        raise WireError(f"unexpected {frame.type.name} frame in an open session")

    def _forward(self, frame: Frame) -> Frame:
        hidden = frame.tensor()
        batch, length, _ = hidden.shape
        mask, self._pending_mask = self._pending_mask, None
        if mask is not None and tuple(mask.shape) != (batch, length):
            raise WireError(f"mask shape {tuple(mask.shape)} does not match hidden states {(batch, length)}")
        if self.runner.batch is not None and self.runner.batch != batch:
            raise WireError(f"batch size changed from {self.runner.batch} to {batch} without a RESET")
        if self.max_context is not None and self.runner.seq_len + length > self.max_context:
            raise WireError(
                f"sequence would reach {self.runner.seq_len + length} positions, over the server's "
                f"--max-context {self.max_context}"
            )
        param = next(self.runner.module.parameters(), None)
        if param is not None:
            hidden = hidden.to(device=param.device, dtype=param.dtype)
        out = self.runner(hidden, mask)
        self.tokens += batch * length
        return tensor_frame(MsgType.HIDDEN, out, frame.codec, self.session_id, frame.seq)

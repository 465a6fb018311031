"""BodySession: one device's text-body state (KV cache, mask history), driven by frames.

It knows tensors and frames but nothing of sockets, so the same session serves the in-process body
and the network server. Every limit a client controls (rows, positions per frame, context, KV
bytes) is checked before any compute or allocation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lambdasplit.engine.batch import batchable
from lambdasplit.errors import LimitError, WireError
from lambdasplit.split.manifest import PartManifest
from lambdasplit.split.parts import PartRunner
from lambdasplit.wire.frame import Frame, MsgType, tensor_frame


@dataclass(frozen=True)
class SessionLimits:
    max_context: int  # positions per row
    max_batch: int  # rows
    max_frame_positions: int  # B x T in one frame
    max_kv_bytes: int  # body KV cache of the whole session


def kv_bytes_per_position(runner: PartRunner) -> int:
    """Body KV-cache bytes one position of one row takes (keys and values of every layer)."""
    config = runner.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    param = next(runner.module.parameters(), None)
    itemsize = param.element_size() if param is not None else 4
    return 2 * runner.layers * heads * head_dim * itemsize


@dataclass
class TextBody:
    """A hosted text body: shared weights plus the manifest a device's parts must match."""

    runner: PartRunner
    manifest: PartManifest

    def open(self, session_id: bytes, limits: SessionLimits) -> BodySession:
        own = PartRunner(self.runner.module, self.runner.role, self.runner.config)
        return BodySession(own, session_id, limits)

    def memory_probe(self) -> torch.Tensor | None:
        return next(self.runner.module.parameters(), None)


class BodySession:
    """Runs the body on HIDDEN frames, appending to this session's own KV cache."""

    def __init__(self, runner: PartRunner, session_id: bytes, limits: SessionLimits) -> None:
        self.runner = runner
        self.session_id = session_id
        self.limits = limits
        self.per_position = kv_bytes_per_position(runner)
        self._pending_mask: torch.Tensor | None = None
        self.tokens = 0

    def new_bytes(self, frame: Frame) -> int:
        """Memory this frame will add (its KV growth), for the scheduler's free-memory guard."""
        if frame.type != MsgType.HIDDEN:
            return 0
        return frame.shape[0] * frame.shape[1] * self.per_position

    def handle(self, frame: Frame) -> Frame | None:
        """Consume one frame; return the reply frame, if the message has one."""
        if frame.type == MsgType.RESET:
            self.runner.reset()
            self._pending_mask = None
            return None
        if frame.type == MsgType.MASK:
            self._check_rows(frame.shape[0])
            self._pending_mask = frame.tensor()
            return None
        if frame.type == MsgType.HIDDEN:
            return self._forward(frame)
        raise WireError(f"unexpected {frame.type.name} frame in an open session")

    def _check_rows(self, batch: int) -> None:
        if batch > self.limits.max_batch:
            raise LimitError(f"{batch} rows in one session exceed the server's --max-batch {self.limits.max_batch}")

    def batch_key(self, frame: Frame) -> int | None:
        """Which shared body this frame's step can be batched on (None: run it alone): a decode
        step (T = 1) of a started sequence, with no mask columns pending."""
        if frame.type != MsgType.HIDDEN or frame.shape[1] != 1 or self._pending_mask is not None:
            return None
        return id(self.runner.module) if batchable(self.runner) else None

    def prepare(self, frame: Frame) -> torch.Tensor:
        """Check a HIDDEN frame against every limit and decode it onto the body's device and dtype."""
        batch, length, _ = frame.shape
        self._check_rows(batch)
        mask = self._pending_mask
        if mask is not None and tuple(mask.shape) != (batch, length):
            raise WireError(f"mask shape {tuple(mask.shape)} does not match hidden states {(batch, length)}")
        if self.runner.batch is not None and self.runner.batch != batch:
            raise WireError(f"batch size changed from {self.runner.batch} to {batch} without a RESET")
        limits = self.limits
        if batch * length > limits.max_frame_positions:
            raise LimitError(
                f"{batch} x {length} positions in one frame exceed the server's --max-frame-positions "
                f"{limits.max_frame_positions}; send the prompt in chunks"
            )
        total = self.runner.seq_len + length
        if total > limits.max_context:
            raise LimitError(f"sequence would reach {total} positions, over the server's --max-context {limits.max_context}")
        if batch * total * self.per_position > limits.max_kv_bytes:
            raise LimitError(
                f"{batch} rows x {total} positions need {batch * total * self.per_position >> 20} MiB of body KV cache, "
                f"over the server's --max-session-kv {limits.max_kv_bytes >> 20} MiB"
            )
        hidden = frame.tensor()
        param = next(self.runner.module.parameters(), None)
        if param is not None:
            hidden = hidden.to(device=param.device, dtype=param.dtype)
        return hidden

    def finish(self, frame: Frame, out: torch.Tensor) -> Frame:
        """The reply to a HIDDEN frame whose step has run (alone or in a batch)."""
        self.tokens += frame.shape[0] * frame.shape[1]
        return tensor_frame(MsgType.HIDDEN, out, frame.codec, self.session_id, frame.seq)

    def _forward(self, frame: Frame) -> Frame:
        hidden = self.prepare(frame)
        mask, self._pending_mask = self._pending_mask, None
        return self.finish(frame, self.runner(hidden, mask))

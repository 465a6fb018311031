"""BodyClient: the one interface through which the device reaches the body, wherever it runs.

Its implementations: `RemoteBody` (device/remote.py) over a WebSocket, and `LocalBody`
(engine/local.py), which the device imports only when it asks for a body in this process.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lambdasplit.wire.codec import Codec
from lambdasplit.wire.frame import Frame, MsgType, tensor_frame
from lambdasplit.wire.protocol import control_frame

log = logging.getLogger(__name__)


@dataclass
class TransferStats:
    """What crossed the device/cloud boundary, counted in real frame bytes."""

    bytes_to_cloud: int = 0
    bytes_from_cloud: int = 0
    frames_to_cloud: int = 0
    frames_from_cloud: int = 0
    seconds: float = 0.0  # wall time of forward(): serialization + network + body compute
    codec_seconds: float = 0.0  # encoding h_K and decoding the reply, on the device
    wait_seconds: float = 0.0  # from the last byte sent to the reply parsed (network + body compute)
    per_step: list[tuple[int, int]] = field(default_factory=list)  # (to, from) bytes per forward

    def reset(self) -> None:
        self.__init__()


class BodyClient(ABC):
    """Runs the body's layers on new positions and keeps the body's KV cache between calls."""

    codec: Codec
    stats: TransferStats
    # A device-side defense applied to h_K before it leaves: f(hidden, is_prompt) -> hidden.
    uplink_defense: Callable[[torch.Tensor, bool], torch.Tensor] | None = None
    # Opt-in record of every frame exchanged, for audits: [("to_cloud" | "from_cloud", bytes)].
    captured: list[tuple[str, bytes]] | None = None
    _positions: int = 0
    # The body's bounds on B x T per frame and on positions per row (from the server's WELCOME, or
    # the local scheduler).
    max_frame_positions: int | None = None
    max_context: int | None = None
    max_tree_positions: int | None = None  # positions of a TREE frame the body verifies (None: it verifies none)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                tree: list[int] | None = None) -> torch.Tensor:
        """Send h_K for T new positions (mask columns only when some are padding); get h_(L-M) back.

        A prompt longer than the body's `max_frame_positions` goes in chunks along T: the body's
        cache grows the same way, so the result equals one frame's (and replay resends the chunks).
        `tree` (each position's parent, wire/protocol.py's TREE) sends one frame the body verifies
        as a draft tree; it must fit `tree_positions()`.
        """
        if self.uplink_defense is not None:
            hidden = self.uplink_defense(hidden, self._positions == 0)
        if tree is not None:
            limit = self.tree_positions()
            if limit is None or len(tree) > limit or attention_mask is not None:
                raise ValueError(f"a tree of {len(tree)} positions does not fit this body (it verifies trees of up to {limit})")
            return self._forward_chunk(hidden, None, tree)
        step = max(1, (self.frame_positions() or hidden.shape[0] * hidden.shape[1]) // hidden.shape[0])
        outs = []
        for start in range(0, hidden.shape[1], step):
            chunk_mask = None if attention_mask is None else attention_mask[:, start:start + step]
            outs.append(self._forward_chunk(hidden[:, start:start + step], chunk_mask))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def _forward_chunk(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                       tree: list[int] | None = None) -> torch.Tensor:
        self._positions += hidden.shape[1]
        start = time.perf_counter()
        frames = []
        if attention_mask is not None and not bool(attention_mask.all()):
            frames.append(tensor_frame(MsgType.MASK, attention_mask, Codec.NONE))
        if tree is not None:
            frames.append(control_frame(MsgType.TREE, {"parents": list(tree)}))
        frames.append(tensor_frame(MsgType.HIDDEN, hidden, self.codec))
        encoded = time.perf_counter() - start
        self.stats.codec_seconds += encoded
        self.stats.seconds += encoded
        return self.exchange(frames).to(device=hidden.device, dtype=hidden.dtype)

    def frame_positions(self) -> int | None:
        """The body's bound on B x T per frame, if it has one."""
        return self.max_frame_positions

    def tree_positions(self) -> int | None:
        """The body's bound on the positions of a TREE frame; None if it verifies no trees."""
        return self.max_tree_positions

    def context_limit(self) -> int | None:
        """The body's bound on positions per row (a server's --max-context), if it has one."""
        return self.max_context

    def exchange(self, frames: list[Frame]) -> torch.Tensor:
        """Deliver encoded frames (the last one is answered) and decode the reply, counting bytes and
        time; the text path and split diffusion both go through here."""
        start = time.perf_counter()
        reply = self._exchange(frames)
        replied = time.perf_counter()
        out = reply.tensor()
        done = time.perf_counter()
        sent, received = sum(f.size for f in frames), reply.size
        self.stats.codec_seconds += done - replied
        self.stats.wait_seconds += replied - start
        self.stats.seconds += done - start
        self.stats.bytes_to_cloud += sent
        self.stats.bytes_from_cloud += received
        self.stats.frames_to_cloud += len(frames)
        self.stats.frames_from_cloud += 1
        self.stats.per_step.append((sent, received))
        return out

    @abstractmethod
    def _exchange(self, frames: list[Frame]) -> Frame:
        """Deliver frames to the body and return its HIDDEN reply."""

    def reset(self) -> None:
        """Start a new sequence: the body drops its KV cache."""
        self._positions = 0
        self._reset()

    @abstractmethod
    def _reset(self) -> None:
        """Tell the body to drop its KV cache."""

    def crop(self, length: int) -> None:
        """Keep only the first `length` positions of the body's KV cache (speculative decoding drops
        the positions the tail rejected)."""
        if not 0 <= length <= self._positions:
            raise ValueError(f"cannot crop {self._positions} positions to {length}")
        if length < self._positions:
            self._positions = length
            self._crop(length)

    def _crop(self, length: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot crop the body's cache")

    def start_capture(self) -> None:
        # info, not a warning: capture is only ever asked for (demo, audits, the UI's image tab), and
        # the demo's first line was this warning.
        log.info("capturing every frame exchanged with the body (for audit)")
        self.captured = []

    def close(self) -> None:  # noqa: B027 - optional hook: bodies without resources keep this no-op
        """Release the connection or resources, if any."""

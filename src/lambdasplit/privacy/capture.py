"""Read captured wire bytes back into the hidden states an observer of the wire would see."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lambdasplit.errors import WireError
from lambdasplit.wire.frame import Limits, MsgType, parse_frame


@dataclass
class Observed:
    """What crossed, per direction: one tensor (B, T, D) per HIDDEN frame, in order."""

    uplink: list[torch.Tensor]  # h_K, device -> cloud
    downlink: list[torch.Tensor]  # h_(L-M), cloud -> device


def observe(captured: list[tuple[str, bytes]]) -> Observed:
    """Parse the frames exactly as captured; anything that is not a HIDDEN frame is skipped."""
    up, down = [], []
    limits = Limits(max_payload=1 << 31, max_elements=1 << 31)
    for direction, data in captured:
        try:
            frame = parse_frame(data, limits)
        except WireError:
            continue  # e.g. TLS ciphertext: nothing to read
        if frame.type == MsgType.HIDDEN:
            (up if direction == "to_cloud" else down).append(frame.tensor().float())
    return Observed(up, down)


def positions(frames: list[torch.Tensor], row: int = 0) -> torch.Tensor:
    """All positions of one sequence, concatenated over frames: (T_total, D)."""
    return torch.cat([f[row] for f in frames], dim=0)

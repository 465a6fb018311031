"""Device-side defenses for the uplink hidden states, applied before a frame is encoded."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)


@dataclass
class GaussianNoise:
    """Adds N(0, (sigma x RMS of each position's state)^2) to h_K, on all positions, only the
    prompt's (prefill) positions, or only decode positions. The seed comes from `secrets` unless
    given, so the cloud cannot regenerate the noise."""

    sigma: float
    where: str = "all"  # "all" | "prompt" | "decode"
    seed: int | None = None
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.where not in ("all", "prompt", "decode"):
            raise ValueError(f"noise position set {self.where!r}: expected all, prompt or decode")
        self.generator = torch.Generator().manual_seed(self.seed if self.seed is not None else secrets.randbits(63))

    def __call__(self, hidden: torch.Tensor, is_prompt: bool) -> torch.Tensor:
        if (self.where == "prompt" and not is_prompt) or (self.where == "decode" and is_prompt):
            return hidden
        rms = hidden.float().pow(2).mean(dim=-1, keepdim=True).sqrt()
        noise = torch.randn(hidden.shape, generator=self.generator) * (self.sigma * rms.cpu())
        return (hidden.float() + noise.to(hidden.device)).to(hidden.dtype)


def random_split_point(low: int, high: int) -> int:
    """A cryptographically random K in [low, high] for one session. The cloud still learns K from
    the layers it is asked to run; this only hides K from an eavesdropper."""
    return low + secrets.randbelow(high - low + 1)

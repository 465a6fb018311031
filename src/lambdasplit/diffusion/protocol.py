"""The tensors a split diffusion step sends, named by the frame's slot byte, and which mode uses which.

paper:      once per image TEXT (+ TEXT_EMBEDS, TIME_IDS for SDXL) and GUIDANCE; per step TIMESTEP,
            then SAMPLE, answered by NOISE (the guided noise prediction).
unet-split: once per image TEXT; per step EMB, then HIDDEN (the K-th down block's output), answered
            by HIDDEN (the inner up blocks' output).
"""

from __future__ import annotations

from enum import IntEnum

MODES = ("paper", "unet-split")


class Slot(IntEnum):
    SAMPLE = 1  # latent model input (2B or B, C, h, w)
    TIMESTEP = 2  # (1,) float32
    TEXT = 3  # encoder hidden states (2B, tokens, dim)
    TEXT_EMBEDS = 4  # SDXL pooled text embeddings (2B, dim)
    TIME_IDS = 5  # SDXL size/crop conditioning (2B, 6)
    GUIDANCE = 6  # (1,) float32 classifier-free guidance scale
    EMB = 7  # time (+ added) embedding after the activation (2B, dim)
    HIDDEN = 8  # inner-block activations (2B, C, h, w), either direction
    NOISE = 9  # guided noise prediction (B, C, h, w), cloud -> device

    @property
    def conditioning(self) -> bool:
        """Sent once per image and kept by the session (replayed after a reconnect)."""
        return self in (Slot.TEXT, Slot.TEXT_EMBEDS, Slot.TIME_IDS, Slot.GUIDANCE)

    @property
    def expects_reply(self) -> bool:
        """The frame that completes a step and is answered."""
        return self in (Slot.SAMPLE, Slot.HIDDEN)


UPLINK = {
    "paper": {Slot.SAMPLE, Slot.TIMESTEP, Slot.TEXT, Slot.TEXT_EMBEDS, Slot.TIME_IDS, Slot.GUIDANCE},
    "unet-split": {Slot.TEXT, Slot.EMB, Slot.HIDDEN},
}

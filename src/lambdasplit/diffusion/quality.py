"""Image fidelity of a lossy transport: PSNR and SSIM (torchmetrics) against the exact image."""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def _tensor(image) -> torch.Tensor:
    """(1, C, H, W) float64 in [0, 1] from an (H, W, C) array or PIL image (uint8 or float)."""
    array = np.asarray(image)
    scale = 255.0 if array.dtype == np.uint8 else 1.0
    return torch.from_numpy(array.astype(np.float64) / scale).permute(2, 0, 1)[None]


def psnr(image, reference) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, 1] (or uint8); inf when identical."""
    a, b = _tensor(image), _tensor(reference)
    if torch.equal(a, b):
        return float("inf")
    return float(peak_signal_noise_ratio(a, b, data_range=1.0))


def ssim(image, reference) -> float:
    """Structural similarity over the colour channels (1.0 when identical)."""
    a, b = _tensor(image), _tensor(reference)
    return float(structural_similarity_index_measure(a, b, data_range=1.0))

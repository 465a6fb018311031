"""Image fidelity of a lossy transport: PSNR and SSIM (scikit-image) against the exact image."""

from __future__ import annotations

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def _float(image) -> np.ndarray:
    array = np.asarray(image)
    return array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)


def psnr(image, reference) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, 1] (or uint8); inf when identical."""
    a, b = _float(image), _float(reference)
    if np.array_equal(a, b):
        return float("inf")
    return float(peak_signal_noise_ratio(b, a, data_range=1.0))


def ssim(image, reference) -> float:
    """Structural similarity over the colour channels (1.0 when identical)."""
    a, b = _float(image), _float(reference)
    window = min(7, *a.shape[:2]) | 1
    return float(structural_similarity(b, a, data_range=1.0, channel_axis=-1, win_size=window))

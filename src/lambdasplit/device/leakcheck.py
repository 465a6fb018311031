"""Check captured wire bytes for the plaintext the device is meant to keep: text and token ids."""

from __future__ import annotations

import numpy as np


def plaintext_found(captured: list[tuple[str, bytes]], texts: list[str], token_ids: list[list[int]]) -> dict[str, bool]:
    """Whether any text (UTF-8 or UTF-16) or any id sequence (16, 32 or 64-bit) occurs in the captured bytes."""
    stream = b"".join(data for _, data in captured)
    found = {"text": False, "token_ids": False}
    for text in texts:
        if text and any(text.encode(enc) in stream for enc in ("utf-8", "utf-16-le", "utf-16-be")):
            found["text"] = True
    for ids in token_ids:
        if len(ids) >= 2 and any(np.asarray(ids, dtype=dt).tobytes() in stream for dt in ("<u2", "<u4", "<u8", ">u4")):
            found["token_ids"] = True
    return found

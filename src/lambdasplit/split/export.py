"""Export a model's parts to disk: DIR/device (head + tail + tokenizer) and DIR/cloud (body)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from lambdasplit.errors import SourceError
from lambdasplit.split.checkpoint import file_sha256, model_fingerprint
from lambdasplit.split.load import open_source, resolve_dtype
from lambdasplit.split.manifest import MANIFEST_NAME, PartManifest
from lambdasplit.split.parts import part_keys

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
_DEVICE_EXTRA_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "generation_config.json", "tokenizer.model",
)
PART_ROLES = {"device": ("head", "tail"), "cloud": ("body",)}


def export_parts(
    source: str | os.PathLike[str] | None,
    split: tuple[int, int] | None,
    out: str | os.PathLike[str],
    dtype: str | None = None,
    allow_shallow: bool = False,
) -> dict[str, Path]:
    """Write each side's tensors, config and manifest; returns {"device": dir, "cloud": dir}."""
    opened = open_source(source, split, allow_shallow)
    if opened.exported is not None:
        raise SourceError(f"{opened.checkpoint.path} is already an exported part; export from the full model")
    torch_dtype = resolve_dtype(dtype, opened)
    checkpoint, spec, config = opened.checkpoint, opened.spec, opened.config
    fingerprint = model_fingerprint(checkpoint)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    written: dict[str, Path] = {}
    for side, roles in PART_ROLES.items():
        directory = Path(out) / side
        directory.mkdir(parents=True, exist_ok=True)
        keys = sorted({key for role in roles for key in part_keys(checkpoint.keys, spec, role, tied)})
        tensors = {k: v.contiguous() for k, v in checkpoint.read(keys, torch_dtype).items()}
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        config.save_pretrained(str(directory))
        if side == "device":
            for name in _DEVICE_EXTRA_FILES:
                if (checkpoint.path / name).is_file():
                    shutil.copy2(checkpoint.path / name, directory / name)
        manifest = PartManifest.describe(side, config, fingerprint, spec, torch_dtype)
        manifest.files = {p.name: file_sha256(p) for p in sorted(directory.glob("*.safetensors"))}
        (directory / MANIFEST_NAME).write_text(manifest.to_json())
        log.info("wrote %s part (%d tensors) to %s", side, len(tensors), directory)
        written[side] = directory
    return written


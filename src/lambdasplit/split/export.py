"""Export a model's parts to disk: DIR/device (head + tail + tokenizer) and DIR/cloud (body)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from lambdasplit.errors import SourceError
from lambdasplit.split.checkpoint import PART_CONFIG_NAME, model_fingerprint
from lambdasplit.split.load import open_source, resolve_dtype
from lambdasplit.split.manifest import MANIFEST_NAME, PartManifest, check_output_dir, hash_files, prepare_output_dir
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
    force: bool = False,
) -> dict[str, Path]:
    """Write each side's tensors, config and manifest; returns {"device": dir, "cloud": dir}.

    `out` must be new or empty (`force` empties it first): the manifest hashes every file of a part
    and loading refuses any other, so nothing already there can slip into a part."""
    check_output_dir(out, force)
    opened = open_source(source, split, allow_shallow)
    if opened.exported is not None:
        raise SourceError(f"{opened.checkpoint.path} is already an exported part; export from the full model")
    torch_dtype = resolve_dtype(dtype, opened)
    checkpoint, spec, config = opened.checkpoint, opened.spec, opened.config
    fingerprint = model_fingerprint(checkpoint)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out = prepare_output_dir(out, force, keep=[checkpoint.path])
    written: dict[str, Path] = {}
    for side, roles in PART_ROLES.items():
        directory = out / side
        directory.mkdir()
        keys = sorted({key for role in roles for key in part_keys(checkpoint.keys, spec, role, tied)})
        tensors = {k: v.contiguous() for k, v in checkpoint.read(keys, torch_dtype).items()}
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        config.to_json_file(str(directory / PART_CONFIG_NAME))
        (directory / "config.json").write_text(json.dumps(_config_stub(side, spec.range("body")), indent=2) + "\n")
        if side == "device":
            for name in _DEVICE_EXTRA_FILES:
                if (checkpoint.path / name).is_file():
                    shutil.copy2(checkpoint.path / name, directory / name)
        manifest = PartManifest.describe(side, config, fingerprint, spec, torch_dtype)
        manifest.files = hash_files(directory)  # the directory started empty: everything in it is ours
        (directory / MANIFEST_NAME).write_text(manifest.to_json())
        log.info("wrote %s part (%d tensors) to %s", side, len(tensors), directory)
        written[side] = directory
    return written



def _config_stub(side: str, body: tuple[int, int]) -> dict[str, str]:
    """config.json of a part: a model type transformers does not know, so AutoConfig, AutoModel* and
    pipeline() refuse the directory instead of filling the other side's layers with random weights."""
    holds = "embeddings, the head and tail layers and the LM head" if side == "device" else (
        f"decoder layers {body[0]}..{body[1] - 1} only")
    return {
        "model_type": f"lambdasplit_{side}_part",
        "note": f"The {side} part of a model split by lambdasplit: it holds the {holds}, so it cannot run alone "
                f"or in transformers. Load it with lambdasplit; the model's config is in {PART_CONFIG_NAME}.",
    }

"""Export a model's parts to disk: DIR/device (head + tail + tokenizer) and DIR/cloud (body)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from lambdasplit.errors import SourceError
from lambdasplit.split.checkpoint import PART_CONFIG_NAME, model_fingerprint
from lambdasplit.split.load import open_source, resolve_dtype
from lambdasplit.split.manifest import MANIFEST_NAME, PartManifest, check_output_dir, hash_files, prepare_output_dir
from lambdasplit.split.parts import part_keys
from lambdasplit.split.quantize import EXACT, check_dtype, check_scheme, quantize_tensors
from lambdasplit.split.sources import is_gguf

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
    quantize: str | None = None,
) -> dict[str, Path]:
    """Write each side's tensors, config and manifest; returns {"device": dir, "cloud": dir}.

    `out` must be new or empty (`force` empties it first): the manifest hashes every file of a part
    and loading refuses any other, so nothing already there can slip into a part. `quantize` (int8,
    int4, gguf-exact) stores the device part's projections, LM head and embeddings quantized; the body
    keeps `dtype`. A GGUF source exports in bfloat16 unless `dtype` says otherwise (its weights were
    4-8 bit, and float32 would only double the bytes), except under gguf-exact, which is float32."""
    check_output_dir(out, force)
    check_scheme(quantize)
    opened = open_source(source, split, allow_shallow)
    if opened.exported is not None:
        raise SourceError(f"{opened.checkpoint.path} is already an exported part; export from the full model")
    torch_dtype = resolve_dtype(dtype or ("bfloat16" if is_gguf(source) and quantize != EXACT else None), opened)
    check_dtype(quantize, torch_dtype)
    checkpoint, spec, config = opened.checkpoint, opened.spec, opened.config
    fingerprint = model_fingerprint(checkpoint)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out = prepare_output_dir(out, force, keep=[checkpoint.path])
    written: dict[str, Path] = {}
    for side, roles in PART_ROLES.items():
        directory = out / side
        directory.mkdir()
        keys = sorted({key for role in roles for key in part_keys(checkpoint.keys, spec, role, tied)})
        scheme = quantize if side == "device" else None
        tensors = quantize_tensors(checkpoint.read(keys, torch_dtype), scheme)
        extra = [checkpoint.path / name for name in _DEVICE_EXTRA_FILES if side == "device"]
        manifest = PartManifest.describe(side, config, fingerprint, spec, torch_dtype, scheme)
        write_part(directory, tensors, config, manifest, extra)
        written[side] = directory
    return written


def write_part(directory: Path, tensors: dict[str, torch.Tensor], config, manifest: PartManifest, extra: list[Path] = ()) -> None:
    """Fill the empty `directory` with one part: weights, the model's config (in part_config.json, under a
    config.json stub), the `extra` files that exist (tokenizer) and the manifest, which hashes them all."""
    metadata = {"format": "pt"} | ({"lambdasplit_quantize": manifest.quantize} if manifest.quantize else {})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / WEIGHTS_NAME), metadata=metadata)
    config.to_json_file(str(directory / PART_CONFIG_NAME))
    stub = _config_stub(manifest.role, manifest.body)
    (directory / "config.json").write_text(json.dumps(stub, indent=2) + "\n")
    for path in extra:
        if path.is_file():
            shutil.copy2(path, directory / path.name)
    manifest.files = hash_files(directory)  # the directory started empty: everything in it is ours
    (directory / MANIFEST_NAME).write_text(manifest.to_json())
    log.info("wrote %s part (%d tensors) to %s", manifest.role, len(tensors), directory)


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

"""Checkpoint: a directory of config.json + safetensors, read tensor by tensor."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from lambdasplit.errors import SourceError
from lambdasplit.paths import cache_dir

# Config keys that describe how a file was written rather than the model itself.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "quantization_config", "dtype", "torch_dtype"}


@dataclass
class Checkpoint:
    """A model directory whose tensors are read lazily by key, so a part loads only its own."""

    path: Path
    _files: dict[str, Path] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if not (self.path / "config.json").is_file():
            raise SourceError(f"{self.path}: no config.json; expected a Hugging Face model directory")
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise SourceError(f"{self.path}: no *.safetensors files (PyTorch .bin checkpoints are not read)")
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    self._files[key] = file

    @cached_property
    def config(self) -> PretrainedConfig:
        return AutoConfig.from_pretrained(str(self.path))

    @property
    def keys(self) -> list[str]:
        return sorted(self._files)

    @property
    def files(self) -> list[Path]:
        return sorted(set(self._files.values()))

    def read(self, keys: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Read only `keys`, optionally cast to `dtype`."""
        missing = [k for k in keys if k not in self._files]
        if missing:
            raise SourceError(f"{self.path}: missing tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self._files[key], []).append(key)
        out: dict[str, torch.Tensor] = {}
        for file, file_keys in by_file.items():
            with safe_open(str(file), framework="pt") as handle:
                for key in file_keys:
                    tensor = handle.get_tensor(key)
                    out[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        return out

    def stored_dtype(self) -> torch.dtype:
        """The dtype of the first floating-point tensor on disk."""
        file = self.files[0]
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_slice(key)
                dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(tensor.get_dtype())
                if dtype is not None:
                    return dtype
        return torch.float32


def file_sha256(path: Path) -> str:
    """sha256 of a file, memoised in the cache by (path, size, mtime) since weights are large."""
    stat = path.stat()
    memo_key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    memo = cache_dir() / "sha256" / memo_key
    if memo.is_file():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(digest.hexdigest())
    return digest.hexdigest()


def model_fingerprint(checkpoint: Checkpoint) -> str:
    """Identity of a full model: its config and the content of its weight files."""
    config = {k: v for k, v in checkpoint.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for file in checkpoint.files:
        digest.update(file_sha256(file).encode())
    return digest.hexdigest()

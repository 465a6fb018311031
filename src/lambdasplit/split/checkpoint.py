"""Checkpoint: a directory of config.json + safetensors, read tensor by tensor."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

try:  # what transformers 5 raises for a config field of the wrong type
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # older huggingface_hub: no strict dataclasses
    class StrictDataclassError(Exception):
        pass
from transformers import AutoConfig, PretrainedConfig

from lambdasplit.errors import SourceError
from lambdasplit.paths import cache_dir

# Config keys that describe how a file was written rather than the model itself.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "quantization_config", "dtype", "torch_dtype"}
# An exported part keeps the model's config here; its config.json is a stub that transformers refuses,
# so `from_pretrained(DIR/device)` cannot build the whole model around a part's few layers (the
# missing layers would be random). Parts exported before this have the real config in config.json.
PART_CONFIG_NAME = "part_config.json"


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
            with _opened(file) as handle:
                for key in handle.keys():
                    self._files[key] = file

    @cached_property
    def config(self) -> PretrainedConfig:
        part_config = self.path / PART_CONFIG_NAME
        try:
            return AutoConfig.from_pretrained(str(part_config if part_config.is_file() else self.path))
        except (OSError, ValueError, TypeError, KeyError, StrictDataclassError) as exc:
            # transformers says "not a valid JSON file" (OSError), an unknown model_type (ValueError),
            # or a field of the wrong type (huggingface_hub's validation error, a ValueError).
            reason = " ".join(str(exc).split())
            name = PART_CONFIG_NAME if part_config.is_file() else "config.json"
            raise SourceError(f"{self.path / name}: not a usable model config ({reason[:200]})") from None

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
            with _opened(file) as handle:
                for key in file_keys:
                    try:
                        tensor = handle.get_tensor(key)
                    except (SafetensorError, OSError) as exc:
                        raise SourceError(f"{file}: cannot read tensor {key} ({exc}); the file is damaged") from None
                    out[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        return out

    def stored_dtype(self) -> torch.dtype:
        """The dtype of the first floating-point tensor on disk."""
        file = self.files[0]
        with _opened(file) as handle:
            for key in handle.keys():
                tensor = handle.get_slice(key)
                dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(tensor.get_dtype())
                if dtype is not None:
                    return dtype
        return torch.float32


def _opened(file: Path):
    """safe_open, with a damaged or truncated file reported as a SourceError naming it."""
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise SourceError(
            f"{file}: not a readable safetensors file ({exc}); it may be truncated or corrupt: re-download or re-export it"
        ) from None


def file_sha256(path: Path) -> str:
    """sha256 of a file, memoised (weights are large) by (path, inode, size, mtime, ctime): ctime
    cannot be set back by hand the way mtime can, so an edited file is always hashed again."""
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"
    memo = cache_dir() / "sha256-v2" / hashlib.sha256(key.encode()).hexdigest()
    if memo.is_file():
        cached = memo.read_text().strip()
        if re.fullmatch(r"[0-9a-f]{64}", cached):
            return cached
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

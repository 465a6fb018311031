"""PartManifest: what a part holds, so device and cloud can prove they belong to the same model."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lambdasplit.errors import SourceError
from lambdasplit.split.checkpoint import file_sha256
from lambdasplit.split.spec import SplitSpec

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


def dtype_named(name: str | None, default: str = "float32") -> torch.dtype:
    """The torch dtype called `name` (else `default`, e.g. an exported part's); a clear error otherwise."""
    name = name or default
    if name not in DTYPES:
        raise SourceError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def verify_files(files: dict[str, str], directory: Path) -> None:
    """Refuse a part whose weight files do not match the sha256 recorded at export."""
    for name, digest in files.items():
        path = Path(directory) / name
        if not path.is_file():
            raise SourceError(f"{directory}: {name}, listed in the manifest, is missing")
        if file_sha256(path) != digest:
            raise SourceError(f"{path}: sha256 does not match the manifest; the part is corrupted or altered")


@dataclass
class PartManifest:
    role: str  # "device" (head + tail) or "cloud" (body) or "full"
    model_type: str
    fingerprint: str
    layers: int
    hidden_size: int
    head: tuple[int, int]
    body: tuple[int, int]
    tail: tuple[int, int]
    dtype: str
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    format_version: int = FORMAT_VERSION

    @property
    def spec(self) -> SplitSpec:
        return SplitSpec(self.head[1], self.layers - self.tail[0], self.layers)

    def compatible_with(self, other: PartManifest) -> str | None:
        """None if the two parts fit together, else the reason they do not."""
        for name in ("fingerprint", "layers", "hidden_size", "head", "body", "tail", "dtype"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"{name} differs: this side has {mine}, the other has {theirs}"
        return None

    def verify(self, directory: Path) -> None:
        verify_files(self.files, directory)

    def as_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> PartManifest:
        try:
            data = dict(data)
            for name in ("head", "body", "tail"):
                data[name] = tuple(int(x) for x in data[name])
            return cls(**data)
        except (KeyError, TypeError, ValueError) as exc:
            raise SourceError(f"malformed manifest: {exc}") from None

    @classmethod
    def read(cls, directory: Path) -> PartManifest | None:
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            return None
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise SourceError(f"{path}: not valid JSON ({exc})") from None

    @classmethod
    def describe(cls, role: str, config, fingerprint: str, spec: SplitSpec, dtype: torch.dtype) -> PartManifest:
        return cls(
            role=role,
            model_type=config.model_type,
            fingerprint=fingerprint,
            layers=spec.layers,
            hidden_size=config.hidden_size,
            head=spec.range("head"),
            body=spec.range("body"),
            tail=spec.range("tail"),
            dtype=DTYPE_NAMES[dtype],
        )

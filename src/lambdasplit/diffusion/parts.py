"""Pipeline parts: which UNet weights each side loads, the manifest that pairs them, and export.

The device part is a normal diffusers directory (text encoders, tokenizers, VAE, scheduler) plus the
UNet's config and, for unet-split, only the outer blocks' weights; the cloud part is the UNet's
config and either all its weights (paper) or only the inner blocks' (unet-split).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from lambdasplit.diffusion.protocol import MODES
from lambdasplit.errors import SourceError, SplitError
from lambdasplit.split.checkpoint import file_sha256
from lambdasplit.split.manifest import (
    DTYPE_NAMES,
    DTYPES,
    FORMAT_VERSION,
    HEX64,
    MANIFEST_NAME,
    ROLES,
    Fields,
    Manifest,
    check_output_dir,
    dtype_named,
    hash_files,
    prepare_output_dir,
)
from lambdasplit.wire.frame import Limits

FAMILIES = {"StableDiffusionXLPipeline": "sdxl", "StableDiffusionPipeline": "sd"}
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


@dataclass
class PipelineManifest(Manifest):
    role: str  # "device", "cloud" or "full"
    family: str  # "sdxl" | "sd"
    mode: str  # "paper" | "unet-split"
    k: int  # outer down/up blocks on the device (0 in paper mode)
    fingerprint: str  # identity of the full UNet: config + weights
    dtype: str
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256, every file of the part
    format_version: int = FORMAT_VERSION

    KIND: ClassVar[str] = "a diffusion pipeline"
    MATCH: ClassVar[tuple[str, ...]] = ("family", "mode", "k", "fingerprint", "dtype")

    def frame_limits(self, max_payload: int = 1 << 31, max_tokens: int | None = None) -> Limits:
        """Diffusion frames carry latents and conditioning, not (B, T, D) hidden states; a 1024 x 1024
        SDXL step's tensors need the larger element bound."""
        return Limits(max_payload=max_payload, max_elements=1 << 30)

    def summary(self, alternatives: list[Manifest] = ()) -> str:
        blocks = "the whole UNet" if self.mode == "paper" else f"the UNet's inner blocks (K={self.k})"
        return f"{self.family} {self.mode}: {blocks}"

    @classmethod
    def from_dict(cls, data: Any) -> PipelineManifest:
        fields = Fields(data, "pipeline manifest")
        return cls(
            role=fields.string("role", choices=ROLES),
            family=fields.string("family", choices=sorted(set(FAMILIES.values()))),
            mode=fields.string("mode", choices=MODES),
            k=fields.integer("k", 0, 64),
            fingerprint=fields.string("fingerprint", HEX64),
            dtype=fields.string("dtype", choices=DTYPES),
            files=fields.files(),
            format_version=fields.version(FORMAT_VERSION),
        )


@dataclass
class PipelineSource:
    """A diffusers pipeline directory (full, or an exported part) opened for one side."""

    path: Path
    family: str
    exported: PipelineManifest | None

    @property
    def unet_dir(self) -> Path:
        return self.path / "unet"

    def fingerprint(self) -> str:
        if self.exported:
            return self.exported.fingerprint
        return unet_fingerprint(self.unet_dir)

    def dtype(self, name: str | None) -> torch.dtype:
        """A named dtype, else the exported part's, else float32."""
        return dtype_named(name, self.exported.dtype if self.exported else "float32")

    def manifest(self, role: str, mode: str, k: int, dtype: torch.dtype) -> PipelineManifest:
        return PipelineManifest(role, self.family, mode, k if mode == "unet-split" else 0, self.fingerprint(), DTYPE_NAMES[dtype])


def open_pipeline(path: str | Path | None, mode: str, k: int) -> PipelineSource:
    """Resolve a pipeline directory (default: the small offline SDXL-shaped one) and check the mode."""
    from lambdasplit.diffusion.tiny import default_pipeline_dir

    if mode not in MODES:
        raise SplitError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    name = str(path or "tiny-sdxl")
    built_in = {"tiny-sdxl": "sdxl", "tiny-sd": "sd"}
    directory = default_pipeline_dir(built_in[name]) if name in built_in else Path(name)
    if not directory.is_dir():
        raise SourceError(f"{directory}: no such pipeline directory")
    exported = PipelineManifest.read(directory)
    if exported is not None:
        exported.verify(directory)
        if (exported.mode, exported.k) != (mode, k if mode == "unet-split" else 0):
            raise SplitError(f"{directory} was exported for mode {exported.mode} K={exported.k}; it cannot serve {mode} K={k}")
        return PipelineSource(directory, exported.family, exported)
    index = directory / "model_index.json"
    if not (directory / "unet" / "config.json").is_file():
        raise SourceError(f"{directory}: not a diffusers pipeline directory (no unet/config.json)")
    family = FAMILIES.get(json.loads(index.read_text()).get("_class_name", "")) if index.is_file() else None
    if family is None:
        raise SourceError(f"{directory}: only StableDiffusionXLPipeline and StableDiffusionPipeline directories are supported")
    return PipelineSource(directory, family, None)


def unet_fingerprint(unet_dir: Path) -> str:
    config = json.loads((unet_dir / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for file in _weight_files(unet_dir):
        digest.update(file_sha256(file).encode())
    return digest.hexdigest()


def _weight_files(unet_dir: Path) -> list[Path]:
    plain = sorted(p for p in unet_dir.glob("*.safetensors") if p.name.count(".") == 1)
    return plain or sorted(unet_dir.glob("*.safetensors"))


def load_unet(
    unet_dir: Path, dtype: torch.dtype, device: str | torch.device = "cpu", select: Callable[[object], list[str]] | None = None
):
    """The UNet with only the weights `select(skeleton)` names loaded (all when None); the other
    modules stay on the meta device and are never run."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    config = UNet2DConditionModel.load_config(str(unet_dir))
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    wanted = set(unet.state_dict()) if select is None else set(select(unet))
    state = {}
    for file in _weight_files(unet_dir):
        with safe_open(str(file), framework="pt") as handle:
            for key in wanted.intersection(handle.keys()):
                state[key] = handle.get_tensor(key).to(device=device, dtype=dtype)
    missing = wanted - set(state)
    if missing:
        raise SourceError(f"{unet_dir}: {len(missing)} UNet weights this part needs are missing, e.g. {min(missing)}")
    unet.load_state_dict(state, strict=False, assign=True)
    return unet.eval()


def export_pipeline(
    source: str | Path | None, mode: str, k: int, out: Path, dtype: torch.dtype = torch.float32, force: bool = False
) -> dict[str, Path]:
    """Write OUT/device and OUT/cloud, each with only its own UNet weights and a manifest that hashes
    every file of the part. OUT must be new or empty; `force` empties it first."""
    from safetensors.torch import save_file

    from lambdasplit.diffusion import unet as cut

    check_output_dir(out, force)
    opened = open_pipeline(source, mode, k)
    if opened.exported:
        raise SourceError(f"{opened.path} is already an exported part")
    full = load_unet(opened.unet_dir, dtype)
    if mode == "unet-split":
        cut.check_k(full, k)
    state = full.state_dict()
    device_keys = cut.outer_keys(full, k) if mode == "unet-split" else []
    cloud_keys = cut.inner_keys(full, k) if mode == "unet-split" else list(state)
    out = prepare_output_dir(out, force, keep=[opened.path])
    written = {}
    for role, keys in (("device", device_keys), ("cloud", cloud_keys)):
        target = out / role
        (target / "unet").mkdir(parents=True)
        shutil.copy2(opened.unet_dir / "config.json", target / "unet" / "config.json")
        if role == "device":
            for item in opened.path.iterdir():
                if item.name not in ("unet", MANIFEST_NAME) and not item.name.startswith("."):
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, target / item.name)
        if keys:
            save_file({key: state[key].contiguous() for key in keys}, str(target / "unet" / WEIGHTS_NAME))
        manifest = opened.manifest(role, mode, k, dtype)
        manifest.files = hash_files(target)  # the directory started empty: everything in it is ours
        (target / MANIFEST_NAME).write_text(manifest.to_json())
        written[role] = target
    return written

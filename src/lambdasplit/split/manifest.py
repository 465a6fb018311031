"""Manifests: what a part holds, so device and cloud can prove they belong to the same model.

`Manifest` is the one contract for text parts (`PartManifest`) and diffusion parts
(`lambdasplit.diffusion.parts.PipelineManifest`): both parse hostile dicts into a `WireError`,
compare with `compatible_with` (naming the server's and the device's side), say what frames a
receiver accepts (`frame_limits`) and list the sha256 of every file of an exported part, which
`verify` checks (and refuses any file the export did not write).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from lambdasplit.defaults import MAX_FRAME_BYTES
from lambdasplit.errors import LambdaSplitError, MismatchError, SourceError, WireError
from lambdasplit.split.checkpoint import file_sha256
from lambdasplit.split.quantize import SCHEMES
from lambdasplit.split.spec import SplitSpec
from lambdasplit.wire.frame import Limits

MANIFEST_NAME = "manifest.json"
# 2: `files` lists every file of the part (config, tokenizer, weights), not only *.safetensors.
FORMAT_VERSION = 2
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DTYPES = {v: k for k, v in DTYPE_NAMES.items()}
ROLES = ("device", "cloud", "full")
MAX_MANIFEST_BYTES = 4 << 20
MAX_FILES = 4096
HEX64 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9_.+-]{1,128}")
# Each kind of manifest (its KIND) by a field only it has, and the server that serves it: a device of
# one kind at a server of the other is told so, not that a field of the other kind is missing.
_KINDS = {"layers": ("a language model", "serve --model or --part"), "family": ("a diffusion pipeline", "serve --pipeline")}
_SIDES = {"cloud": ("the server's body", "has"), "device": ("the device's parts", "have"), "full": ("the full model", "has")}


def dtype_named(name: str | None, default: str = "float32") -> torch.dtype:
    """The torch dtype called `name` (else `default`, e.g. an exported part's); a clear error otherwise."""
    name = name or default
    if name not in DTYPES:
        raise SourceError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


# ---- parsing untrusted dicts ---------------------------------------------------------------------

_MISSING = object()


def shown(value: Any, limit: int = 40) -> str:
    """A value safe to print in one line: escapes newlines and terminal control sequences."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return str(value) if abs(value) < 10**18 else f"a {value.bit_length()}-bit integer"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        text = ascii(value[:limit])
        return text + ("..." if len(value) > limit else "")
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} items" if len(value) > 4 else "[" + ", ".join(shown(v, 16) for v in value) + "]"
    if isinstance(value, dict):
        return f"an object with {len(value)} keys"
    return f"a {type(value).__name__}"


class Fields:
    """Typed reads from a manifest dict received from disk or the network; every failure is a WireError."""

    def __init__(self, data: Any, what: str) -> None:
        if not isinstance(data, dict):
            raise WireError(f"malformed {what}: expected a JSON object, got {shown(data)}")
        self.data, self.what = data, what

    def _get(self, name: str, default: Any = _MISSING) -> Any:
        value = self.data.get(name, default)
        if value is _MISSING:
            raise WireError(f"malformed {self.what}: {name} is missing")
        return value

    def fail(self, name: str, problem: str) -> WireError:
        return WireError(f"malformed {self.what}: {name} {problem}")

    def integer(self, name: str, low: int, high: int, default: Any = _MISSING) -> int:
        value = self._get(name, default)
        if type(value) is not int:  # bool is an int subclass; floats (1e400 = inf, NaN) are refused too
            raise self.fail(name, f"must be an integer, got {shown(value)}")
        if not low <= value <= high:
            raise self.fail(name, f"= {shown(value)} is outside [{low}, {high}]")
        return value

    def string(self, name: str, pattern: re.Pattern[str] | None = None, choices: Iterable[str] = ()) -> str:
        value = self._get(name)
        choices = tuple(choices)
        if not isinstance(value, str):
            raise self.fail(name, f"must be a string, got {shown(value)}")
        if choices and value not in choices:
            raise self.fail(name, f"= {shown(value)} is not one of {', '.join(choices)}")
        if pattern is not None and not pattern.fullmatch(value):
            raise self.fail(name, f"= {shown(value)} is not a valid value")
        return value

    def optional_string(self, name: str, choices: Iterable[str]) -> str | None:
        """An absent or null field is None; otherwise one of `choices`."""
        return None if self.data.get(name) is None else self.string(name, choices=choices)

    def pair(self, name: str, high: int) -> tuple[int, int]:
        value = self._get(name)
        if not isinstance(value, (list, tuple)) or len(value) != 2 or any(type(v) is not int for v in value):
            raise self.fail(name, f"must be a [start, stop] pair of integers, got {shown(value)}")
        start, stop = value
        if not 0 <= start <= stop <= high:
            raise self.fail(name, f"= {shown(list(value))} is not a range within [0, {high}]")
        return start, stop

    def files(self, name: str = "files") -> dict[str, str]:
        value = self._get(name, {})
        if not isinstance(value, dict) or len(value) > MAX_FILES:
            raise self.fail(name, f"must map at most {MAX_FILES} file names to sha256 digests, got {shown(value)}")
        for path, digest in value.items():
            if not is_safe_relative(path):
                raise self.fail(name, f"lists {shown(path)}, which is not a plain relative file name")
            if not isinstance(digest, str) or not HEX64.fullmatch(digest):
                raise self.fail(name, f"gives {shown(digest)} for {shown(path)}, not a sha256 digest")
        return dict(value)

    def version(self, current: int) -> int:
        version = self.integer("format_version", 0, 1 << 16)
        if version != current:
            hint = (" (it predates hashing every file of a part: export the parts again)"
                    if version < current else " (from a newer lambdasplit: upgrade this side)")
            raise self.fail("format_version", f"is {version}; this lambdasplit reads {current}{hint}")
        return version


def is_safe_relative(path: Any) -> bool:
    """A relative POSIX path of plain name components: no '..', no absolute or drive paths."""
    if not isinstance(path, str) or len(path) > 512:
        return False
    parts = path.split("/")
    return all(_NAME.fullmatch(p) and p not in (".", "..") for p in parts)


# ---- files on disk -------------------------------------------------------------------------------

def _part_files(directory: Path) -> list[str]:
    """Every file under `directory` (links included) except the manifest, as relative POSIX paths."""
    found = []
    for root, dirs, names in os.walk(directory, followlinks=False):
        base = Path(root)
        for name in names + [d for d in dirs if (base / d).is_symlink()]:
            relative = (base / name).relative_to(directory).as_posix()
            if relative != MANIFEST_NAME:
                found.append(relative)
    return sorted(found)


def hash_files(directory: Path) -> dict[str, str]:
    """{relative path: sha256} for every file of a freshly written part directory."""
    directory = Path(directory)
    files = {}
    for relative in _part_files(directory):
        if not is_safe_relative(relative) or not (directory / relative).is_file():
            raise SourceError(f"{directory / relative}: cannot be part of an exported part (odd name, or not a plain file)")
        files[relative] = file_sha256(directory / relative)
    return files


def verify_files(files: dict[str, str], directory: Path) -> None:
    """Refuse a part directory holding a file its manifest does not list, or a listed file that is
    missing or whose sha256 differs from the one recorded at export."""
    directory = Path(directory)
    for relative in _part_files(directory):
        if relative not in files:
            raise SourceError(
                f"{directory / relative}: not listed in {directory / MANIFEST_NAME}; an exported part holds only "
                "the files its export wrote (remove this file, or export the parts again)"
            )
    for name, digest in files.items():
        path = directory / name
        if not path.is_file():
            raise SourceError(f"{path}: listed in the manifest, is missing")
        if file_sha256(path) != digest:
            raise SourceError(f"{path}: sha256 does not match the manifest; the part is corrupted or altered")


def _dangerous(target: Path) -> str | None:
    home = Path.home().resolve()
    cwd = Path.cwd().resolve()
    if len(target.parts) <= 2:
        return "it is the root directory or a top-level directory"
    if target == home or target in home.parents:
        return "it is your home directory or holds it"
    if target == cwd or target in cwd.parents:
        return "it is the current directory or holds it"
    if (target / ".git").exists():
        return "it holds a git repository"
    return None


def check_output_dir(out: str | os.PathLike[str], force: bool = False) -> Path:
    """The cheap checks of `prepare_output_dir`, to run before any work: not a file, and empty unless `force`."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise LambdaSplitError(f"--out {out} is a file; exports go into a new or empty directory")
    if out.is_dir() and not force and any(out.iterdir()):
        raise LambdaSplitError(
            f"--out {out} is not empty; choose a new or empty directory, or pass --force to delete its contents first"
        )
    return out


def prepare_output_dir(out: str | os.PathLike[str], force: bool = False, keep: Iterable[Path] = ()) -> Path:
    """Create `out` for an export: refuse a file, refuse a non-empty directory unless `force`, which
    empties it first, but never for /, a top-level directory, $HOME, the working directory or one
    holding a path in `keep` (the model being exported)."""
    out = check_output_dir(out, force)
    if out.is_dir() and any(out.iterdir()):
        target = out.resolve()
        reason = _dangerous(target)
        for path in keep:
            path = Path(path).resolve()
            if path == target or target in path.parents:
                reason = f"it holds the source {path}"
        if reason:
            raise LambdaSplitError(f"refusing --force on {out}: {reason}")
        for child in out.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


# ---- the contract --------------------------------------------------------------------------------

class Manifest(ABC):
    """What text and diffusion manifests share; callers use only this, never the concrete class."""

    KIND: ClassVar[str] = "manifest"
    MATCH: ClassVar[tuple[str, ...]] = ()  # fields both sides of a split must agree on

    role: str
    fingerprint: str
    dtype: str
    files: dict[str, str]
    format_version: int

    @classmethod
    @abstractmethod
    def from_dict(cls, data: Any) -> Manifest:
        """Parse a manifest from disk or the network; anything malformed raises WireError."""

    @classmethod
    def from_peer(cls, data: Any) -> Manifest:
        """The device's manifest from its HELLO, parsed as this server's kind; a device of the other
        kind (a text client at an image server, or the reverse) gets a MismatchError saying so."""
        for key, (kind, server) in _KINDS.items():
            if isinstance(data, dict) and key in data and kind != cls.KIND:
                raise MismatchError(f"this server serves {cls.KIND}, but the device holds {kind}; "
                                    f"point the device at a server started with `lambdasplit {server}`")
        return cls.from_dict(data)

    @abstractmethod
    def frame_limits(self, max_payload: int = MAX_FRAME_BYTES, max_tokens: int | None = None) -> Limits:
        """What a receiver of this part's frames accepts (shapes, element and byte bounds)."""

    @abstractmethod
    def summary(self, alternatives: list[Manifest] = ()) -> str:
        """What this part computes, in a few words (with `alternatives` hosted beside it)."""

    def as_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, sort_keys=True)

    def compatible_with(self, other: Manifest) -> str | None:
        """None if the two parts fit together, else the reason, naming whose part has what."""
        mine, theirs = _side(self.role), _side(other.role)
        if mine[0] == theirs[0]:
            mine, theirs = (f"{mine[0]} (here)", mine[1]), (f"{theirs[0]} (there)", theirs[1])
        if type(other) is not type(self):
            kind = getattr(other, "KIND", type(other).__name__)
            return f"kind differs: {mine[0]} {mine[1]} {self.KIND}, {theirs[0]} {theirs[1]} {kind}"
        for name in self.MATCH:
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                return f"{name} differs: {mine[0]} {mine[1]} {_value(a)}, {theirs[0]} {theirs[1]} {_value(b)}"
        return None

    def verify(self, directory: Path) -> None:
        """Refuse the exported directory unless it holds exactly the listed files, unmodified."""
        verify_files(self.files, directory)

    @classmethod
    def read(cls, directory: Path):
        """The manifest of an exported part directory, or None for a plain model directory."""
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            return None
        try:
            if path.stat().st_size > MAX_MANIFEST_BYTES:
                raise WireError(f"larger than {MAX_MANIFEST_BYTES >> 20} MiB")
            return cls.from_dict(json.loads(path.read_text(), parse_constant=_no_constant))
        except (WireError, ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise SourceError(f"{path}: {exc}") from None


def _no_constant(name: str) -> Any:
    raise WireError(f"not valid JSON for a manifest ({name} is not a number)")


def _side(role: str) -> tuple[str, str]:
    return _SIDES.get(role, (f"the {role} part", "has"))


def _value(value: Any) -> str:
    return f"({value[0]}, {value[1]})" if isinstance(value, tuple) else str(value)


@dataclass
class PartManifest(Manifest):
    role: str  # "device" (head + tail) or "cloud" (body) or "full"
    model_type: str
    fingerprint: str
    layers: int
    hidden_size: int
    head: tuple[int, int]
    body: tuple[int, int]
    tail: tuple[int, int]
    dtype: str
    files: dict[str, str] = field(default_factory=dict)  # relative file name -> sha256, every file of the part
    format_version: int = FORMAT_VERSION
    # The device parts' weight precision (int8, int4; None: `dtype`). The device's own business: the
    # body never sees these weights, so it is not among MATCH.
    quantize: str | None = None

    KIND: ClassVar[str] = "a language model"
    MATCH: ClassVar[tuple[str, ...]] = ("fingerprint", "layers", "hidden_size", "head", "body", "tail", "dtype")

    @property
    def spec(self) -> SplitSpec:
        return SplitSpec(self.head[1], self.layers - self.tail[0], self.layers)

    def frame_limits(self, max_payload: int = MAX_FRAME_BYTES, max_tokens: int | None = None) -> Limits:
        """What a receiver of this part's frames accepts: (B, T, D) hidden states with this D."""
        return Limits(max_payload=max_payload, hidden_size=self.hidden_size, max_tokens=max_tokens)

    def summary(self, alternatives: list[Manifest] = ()) -> str:
        text = f"layers {self.body[0]}..{self.body[1] - 1}"
        if alternatives:
            text += f", or from {alternatives[-1].body[0]} per session"  # type: ignore[attr-defined]
        return text

    @classmethod
    def from_dict(cls, data: Any) -> PartManifest:
        fields = Fields(data, "part manifest")
        layers = fields.integer("layers", 1, 1 << 16)
        head, body, tail = (fields.pair(name, layers) for name in ("head", "body", "tail"))
        if head[0] != 0 or head[1] != body[0] or body[1] != tail[0] or tail[1] != layers:
            raise fields.fail("head/body/tail", f"= {list(head)}, {list(body)}, {list(tail)} do not cover 0..{layers} in order")
        return cls(
            role=fields.string("role", choices=ROLES),
            model_type=fields.string("model_type", _NAME),
            fingerprint=fields.string("fingerprint", HEX64),
            layers=layers,
            hidden_size=fields.integer("hidden_size", 1, 1 << 20),
            head=head,
            body=body,
            tail=tail,
            dtype=fields.string("dtype", choices=DTYPES),
            files=fields.files(),
            format_version=fields.version(FORMAT_VERSION),
            quantize=fields.optional_string("quantize", choices=SCHEMES),
        )

    @classmethod
    def describe(
        cls, role: str, config, fingerprint: str, spec: SplitSpec, dtype: torch.dtype, quantize: str | None = None
    ) -> PartManifest:
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
            quantize=quantize,
        )

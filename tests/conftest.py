"""Shared fixtures: the embedded SmolLM2, tiny seeded models of every supported architecture, and
the unsplit transformers model as the oracle."""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Triton reads this when it is first imported: on a machine without a GPU its interpreter runs the
# paged decode kernel on CPU tensors (tests/test_decode_kernel.py turns the kernel on for CPU bodies).
if not glob.glob("/dev/nvidia[0-9]*"):  # a container given one GPU may see only /dev/nvidia3
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from lambdasplit.split.sources import resolve_source  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")

# Small but structurally faithful configs: GQA, several layers, and the per-layer attention types
# (sliding/full) where the family has them.
TINY = {
    "llama": dict(tie_word_embeddings=True),
    "mistral": dict(sliding_window=4, tie_word_embeddings=False),
    "qwen2": dict(tie_word_embeddings=False),
    "qwen3": dict(tie_word_embeddings=True, head_dim=16),
    "gemma3_text": dict(
        sliding_window=4, head_dim=16, query_pre_attn_scalar=16, tie_word_embeddings=True,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
    ),
}
TINY_COMMON = dict(
    vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    bos_token_id=1, eos_token_id=2, pad_token_id=2,
)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return resolve_source(None).path


def build_tiny(model_type: str, directory: Path, tokenizer_from: Path, seed: int = 0, **overrides) -> Path:
    """A seeded random model of `model_type` saved as a HF directory with SmolLM2's tokenizer."""
    config = AutoConfig.for_model(model_type, **{**TINY_COMMON, **TINY[model_type], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init make every layer matter
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.08)
    model.save_pretrained(str(directory))
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            shutil.copy2(tokenizer_from / name, directory / name)
    return directory


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, smollm2_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {t: build_tiny(t, root / t, smollm2_dir, seed=i) for i, t in enumerate(TINY)}


@pytest.fixture(scope="module")
def llama(tiny_models) -> Path:
    """The tiny seeded Llama most engine, wire and model tests run on."""
    return tiny_models["llama"]


_ORACLES: dict[Path, torch.nn.Module] = {}


def oracle(directory: Path) -> torch.nn.Module:
    """The unsplit model, loaded by transformers itself."""
    if directory not in _ORACLES:
        _ORACLES[directory] = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    return _ORACLES[directory]


@pytest.fixture(scope="module")
def local(llama):
    """A split-2,2 body in this process (fp32 frames), shared by a test module."""
    from lambdasplit.engine.local import load_local_body
    from lambdasplit.wire.codec import Codec

    body = load_local_body(str(llama), (2, 2), codec=Codec.FP32)
    yield body
    body.scheduler.shutdown()


@pytest.fixture(scope="module")
def server(local):
    """A body server in a thread over `local`'s bodies."""
    from tests.test_server_hardening import ThreadServer

    server = ThreadServer(local.scheduler.bodies)
    yield server
    server.close()

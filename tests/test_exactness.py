"""Every split reproduces the unsplit transformers model: same greedy ids, logits within 1e-4."""

import pytest
import torch

from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.wire.frame import HEADER_SIZE
from tests.conftest import TINY
from tests.splitcheck import compare

TOL = 1e-4
PROMPT = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 2030, 30, 4093, 198, 1022]])


@pytest.mark.parametrize("model_type", list(TINY))
@pytest.mark.parametrize("split", [(1, 1), (2, 2), (3, 2), (1, 4), (4, 1), (2, 3)])
def test_tiny_models_match_generate(tiny_models, model_type, split):
    result = compare(tiny_models[model_type], split, PROMPT, new_tokens=10)
    assert result.split.token_ids == result.oracle_ids
    assert len(result.split.token_ids[0]) == 10
    assert result.max_logit_error < TOL


@pytest.mark.parametrize("model_type", list(TINY))
def test_shallow_edges_match_generate(tiny_models, model_type):
    for split in [(0, 3), (3, 0), (0, 0), (0, 5), (5, 0)]:
        result = compare(tiny_models[model_type], split, PROMPT, new_tokens=6, allow_shallow=True)
        assert result.split.token_ids == result.oracle_ids, split
        assert result.max_logit_error < TOL, split


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_left_padded_batch_matches_generate(tiny_models, model_type):
    runtime = SplitRuntime.load(tiny_models[model_type], (2, 2))
    ids, mask = runtime.encode(["Hi", "Tell me a long story about a dragon and a knight", "Paris?"])
    assert (mask == 0).any(), "the batch must contain padding"
    result = compare(tiny_models[model_type], (2, 2), ids, mask, new_tokens=8, runtime=runtime)
    assert result.split.token_ids == result.oracle_ids
    assert result.max_logit_error < TOL


@pytest.mark.parametrize("split", [(2, 2), (1, 1), (1, 28), (28, 1), (15, 14), (14, 15)])
def test_smollm2_matches_generate(smollm2_dir, split):
    runtime = SplitRuntime.load(None, split)
    ids, _ = runtime.encode("What is the capital of France?")
    result = compare(None, split, ids, new_tokens=16, runtime=runtime)
    assert result.split.token_ids == result.oracle_ids
    assert result.max_logit_error < TOL
    assert "Paris" in result.split.text


def test_smollm2_batch_matches_generate(smollm2_dir):
    runtime = SplitRuntime.load(None, (3, 2))
    ids, mask = runtime.encode(["Name a color.", "Write one sentence about the sea and the wind."])
    result = compare(None, (3, 2), ids, mask, new_tokens=12, runtime=runtime)
    assert result.split.token_ids == result.oracle_ids
    assert result.max_logit_error < TOL


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_step_bytes_do_not_grow(tiny_models, batch):
    """Prefill sends the prompt's h_K once; each decode step one position per row, in both directions."""
    source = tiny_models["llama"]
    runtime = SplitRuntime.load(source, (2, 2))
    result = compare(source, (2, 2), PROMPT.repeat(batch, 1), new_tokens=12, runtime=runtime)
    hidden = runtime.config.hidden_size
    prefill = HEADER_SIZE + batch * PROMPT.shape[1] * hidden * 4
    decode = HEADER_SIZE + batch * 1 * hidden * 4
    assert result.per_step_bytes[0] == (prefill, prefill)
    assert result.per_step_bytes[1:] == [(decode, decode)] * 11
    assert result.split.bytes_to_cloud == prefill + 11 * decode

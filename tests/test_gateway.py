"""The OpenAI-compatible gateway, driven by the official `openai` client, against a real body server."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.request
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import GenerationConfig

from lambdasplit.cloud.process import ServerProcess
from lambdasplit.device.body import BodyClient, TransferStats
from lambdasplit.device.remote import RemoteBody
from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.device.sampling import OpenAIPenalties, SamplingParams
from lambdasplit.engine.local import load_local_body
from lambdasplit.errors import (
    AuthError,
    CapacityError,
    ComputeError,
    LimitError,
    MismatchError,
    ProtocolError,
    UnavailableError,
)
from lambdasplit.gateway.app import create_app, default_model_name
from lambdasplit.gateway.protected import ProtectedChats
from lambdasplit.gateway.schema import SamplingDefaults
from lambdasplit.privacy.capture import observe
from lambdasplit.privacy.protect import ProtectedChat, Protection
from lambdasplit.web.conversation import Conversation
from lambdasplit.web.pool import SessionPool
from lambdasplit.wire.codec import Codec
from tests.conftest import oracle

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
]
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"  # greedy decoding keeps counting for a long time


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(predicate, what: str, timeout: float = 120.0):
    """Poll `predicate` until it returns a true value."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


@contextlib.contextmanager
def _serving(app):
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _wait_for(lambda: server.started, "the gateway to start", 60)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _client(url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, timeout=120, **kw)


@pytest.fixture(scope="module")
def runtime(smollm2_dir):
    return SplitRuntime.load(None, (2, 2))


@pytest.fixture(scope="module")
def stack(runtime):
    with ServerProcess("--split", "2,2") as body_server:
        # fp32 on the wire, so that answers equal the in-process split's exactly (bf16 may flip near-ties)
        connect = lambda: RemoteBody(body_server.url, runtime.manifest, Codec.FP32)  # noqa: E731
        # No multi-turn reuse here: these tests count the server's open sessions (reuse: the `reuse` fixture).
        with _serving(create_app(runtime, connect, "smollm2", conversations=0)) as url:
            yield SimpleNamespace(url=url, runtime=runtime, body_server=body_server, client=_client(url), connect=connect)


@pytest.fixture(scope="module")
def gateway(stack):
    return stack.client, stack.runtime


def _metrics(body_server) -> dict[str, float]:
    text = urllib.request.urlopen(body_server.url.replace("ws://", "http://") + "/metrics", timeout=5).read().decode()
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}


def _idle(body_server) -> dict[str, float]:
    """The server's metrics once no body session is open."""
    return _wait_for(lambda: (m := _metrics(body_server))["lambdasplit_sessions_active"] == 0 and m, "no open sessions")


_LOCAL: list = []


def _local_body():
    if not _LOCAL:
        _LOCAL.append(load_local_body(None, (2, 2)))
    return _LOCAL[0]


def _expected(runtime, ids, n):
    return runtime.generate_ids(_local_body(), ids, None, SamplingParams(max_new_tokens=n))


def _ids(runtime, prompt):
    return runtime.tokenizer(prompt, return_tensors="pt")["input_ids"]


def test_models(gateway):
    client, _ = gateway
    assert [m.id for m in client.models.list().data] == ["smollm2"]


def test_chat_completion_matches_the_split_model(gateway):
    client, runtime = gateway
    reply = client.chat.completions.create(model="smollm2", messages=MESSAGES, temperature=0, max_tokens=24)
    expected = _expected(runtime, runtime.encode_chat(MESSAGES), 24)
    assert reply.choices[0].message.content == expected.text
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage.prompt_tokens == runtime.encode_chat(MESSAGES).shape[1]
    assert reply.usage.completion_tokens == len(expected.token_ids[0])
    assert reply.choices[0].finish_reason == expected.finish_reasons[0]


def test_streaming_chat_with_usage(gateway):
    client, runtime = gateway
    stream = client.chat.completions.create(
        model="smollm2", messages=MESSAGES, temperature=0, max_tokens=24, stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage, reasons = [], None, []
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    expected = _expected(runtime, runtime.encode_chat(MESSAGES), 24)
    assert "".join(pieces) == expected.text and len(pieces) > 2
    assert usage is not None and usage.completion_tokens == len(expected.token_ids[0])
    assert reasons == [expected.finish_reasons[0]]


def test_completions_streaming_and_not(gateway):
    client, runtime = gateway
    prompt = "The three primary colors are"
    plain = client.completions.create(model="smollm2", prompt=prompt, temperature=0, max_tokens=12)
    ids, _ = runtime.encode(prompt, raw=True)
    assert plain.choices[0].text == _expected(runtime, ids, 12).text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2", prompt=prompt, temperature=0, max_tokens=12, stream=True) if c.choices)
    assert streamed == plain.choices[0].text


def test_bad_request_gets_a_clear_error(gateway):
    client, _ = gateway
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "  "}], max_tokens=4)


def _stopped_early(stack, before: dict[str, float], max_tokens: int) -> int:
    """Waits until the server has closed every session and returns how many tokens the abandoned
    request generated; asserts that the unsplit-equivalent local split would not have stopped by itself."""
    after = _idle(stack.body_server)
    prompt_len = _ids(stack.runtime, COUNTING).shape[1]
    generated = int(after["lambdasplit_tokens_served_total"] - before["lambdasplit_tokens_served_total"]) - prompt_len + 1
    assert 0 < generated < max_tokens
    # The model would have gone on: no EOS in the next tokens, so the generation stopped because it was cancelled.
    more = _expected(stack.runtime, _ids(stack.runtime, COUNTING), generated + 8)
    assert len(more.token_ids[0]) == generated + 8 and more.finish_reasons == ["length"]
    return generated


def test_an_abandoned_stream_is_cancelled_and_the_next_request_is_served(stack):
    before = _idle(stack.body_server)
    stream = stack.client.completions.create(model="smollm2", prompt=COUNTING, temperature=0, max_tokens=1000, stream=True)
    pieces = []
    for chunk in stream:
        pieces.append(chunk.choices[0].text)
        if len(pieces) == 3:
            break
    assert _metrics(stack.body_server)["lambdasplit_sessions_active"] == 1
    stream.close()  # the client goes away mid-stream
    _stopped_early(stack, before, 1000)
    # The gateway is not stuck: the next completion is answered, and correctly.
    reply = stack.client.chat.completions.create(model="smollm2", messages=MESSAGES, temperature=0, max_tokens=12)
    assert reply.choices[0].message.content == _expected(stack.runtime, stack.runtime.encode_chat(MESSAGES), 12).text
    assert "".join(pieces) == _expected(stack.runtime, _ids(stack.runtime, COUNTING), 3).text


def test_an_abandoned_plain_request_stops_generating(stack):
    before = _idle(stack.body_server)
    port = int(stack.url.rsplit(":", 1)[1])
    payload = json.dumps({"model": "smollm2", "prompt": COUNTING, "temperature": 0, "max_tokens": 1000}).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload
    )
    prompt_len = _ids(stack.runtime, COUNTING).shape[1]
    served = lambda: _metrics(stack.body_server)["lambdasplit_tokens_served_total"] - before["lambdasplit_tokens_served_total"]  # noqa: E731
    _wait_for(lambda: served() >= prompt_len + 4, "the request to be generating")
    sock.close()  # the client gives up before the answer
    _stopped_early(stack, before, 1000)
    final = _metrics(stack.body_server)["lambdasplit_tokens_served_total"]
    reply = stack.client.completions.create(model="smollm2", prompt="The sky is", temperature=0, max_tokens=4)
    assert reply.choices[0].text == _expected(stack.runtime, _ids(stack.runtime, "The sky is"), 4).text
    # Only the new request's positions were served after the abandoned one stopped.
    assert _idle(stack.body_server)["lambdasplit_tokens_served_total"] - final == _ids(stack.runtime, "The sky is").shape[1] + 3


def _shared_steps(body_server) -> float:
    """Body forwards that have run more than one session (the body server's step histogram)."""
    metrics = _metrics(body_server)
    return metrics["lambdasplit_step_sessions_count"] - metrics['lambdasplit_step_sessions_bucket{le="1.0"}']


def test_concurrent_requests_overlap_and_are_all_correct(stack):
    prompts = ["The three primary colors are", "My favourite recipe for soup is", COUNTING]
    results: dict[int, str] = {}
    errors: list[BaseException] = []
    shared_before = _shared_steps(stack.body_server)

    def run(i: int) -> None:
        try:
            stream = stack.client.completions.create(model="smollm2", prompt=prompts[i], temperature=0, max_tokens=24, stream=True)
            results[i] = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(results) == 3
    # They ran at the same time: the body server batched their sessions into shared forwards.
    assert _shared_steps(stack.body_server) > shared_before
    for i, prompt in enumerate(prompts):
        assert results[i] == _expected(stack.runtime, _ids(stack.runtime, prompt), 24).text
    _idle(stack.body_server)  # every session was closed


class _FailingBody(BodyClient):
    """A body whose every call fails with `error`."""

    def __init__(self, error: Exception) -> None:
        self.error, self.codec, self.stats = error, Codec.FP32, TransferStats()
        self.closed = False

    def _exchange(self, frames):
        raise self.error

    def _reset(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


@pytest.fixture(scope="module")
def failing(runtime):
    """A gateway whose body is whatever `state.connect` builds."""
    state = SimpleNamespace(connect=None, bodies=[])

    def connect():
        body = state.connect()
        state.bodies.append(body)
        return body

    with _serving(create_app(runtime, connect, "smollm2", api_key="secret")) as url:
        state.url = url
        yield state


@pytest.mark.parametrize(
    "error, status, retry_after, type_",
    [
        (CapacityError("the body server is full", retry_after=2.5), 429, "3", "rate_limit_error"),
        (UnavailableError("cannot reach the body server"), 503, "1", "server_error"),
        (UnavailableError("body server restarting", retry_after=7), 503, "7", "server_error"),
        (ProtocolError("malformed frame"), 400, None, "invalid_request_error"),
        (LimitError("over the server's max context"), 400, None, "invalid_request_error"),
        (AuthError("the body server refused the token"), 502, None, "server_error"),
        (MismatchError("parts do not match"), 502, None, "server_error"),
        (ComputeError("out of GPU memory"), 502, None, "server_error"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_body_errors_map_to_openai_statuses(failing, error, status, retry_after, type_, stream):
    failing.connect = lambda: _FailingBody(error)
    response = httpx.post(
        f"{failing.url}/v1/completions", headers={"Authorization": "Bearer secret"}, timeout=60,
        json={"model": "smollm2", "prompt": "Hello", "max_tokens": 4, "stream": stream},
    )
    assert response.status_code == status
    assert response.headers.get("retry-after") == retry_after
    assert response.json() == {"error": {"message": str(error), "type": type_, "param": None, "code": error.code.value}}
    assert failing.bodies[-1].closed


def test_openai_client_sees_the_matching_exceptions(failing):
    client = _client(failing.url, api_key="secret")
    failing.connect = lambda: _FailingBody(CapacityError("the body server is full", retry_after=2))
    with pytest.raises(openai.RateLimitError, match="full") as caught:
        client.completions.create(model="smollm2", prompt="Hello", max_tokens=4)
    assert caught.value.response.headers["retry-after"] == "2" and caught.value.code == "capacity"
    with pytest.raises(openai.AuthenticationError) as caught:
        _client(failing.url, api_key="wrong").models.list()
    assert caught.value.response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="smollm2", prompt="Hello", max_tokens=0)


def test_unreachable_body_server_is_503(failing, runtime):
    port = _free_port()  # nothing listens here
    failing.connect = lambda: RemoteBody(f"ws://127.0.0.1:{port}", runtime.manifest, reconnect_window=0, retries=0)
    response = httpx.post(
        f"{failing.url}/v1/chat/completions", headers={"Authorization": "Bearer secret"}, timeout=60,
        json={"model": "smollm2", "messages": MESSAGES, "max_tokens": 4},
    )
    assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error"
    assert str(port) in error["message"]


class _FailsAfter(RemoteBody):
    """A real body session that fails with a compute error on its `n`-th call."""

    def __init__(self, *args, n: int, **kw) -> None:
        super().__init__(*args, **kw)
        self.n, self.calls = n, 0

    def _exchange(self, frames):
        self.calls += 1
        if self.calls == self.n:
            raise ComputeError("the body ran out of memory")
        return super()._exchange(frames)


def test_an_error_mid_stream_is_an_sse_error_event(failing, stack):
    failing.connect = lambda: _FailsAfter(stack.body_server.url, stack.runtime.manifest, Codec.FP32, n=6)
    client = _client(failing.url, api_key="secret")
    stream = client.completions.create(model="smollm2", prompt=COUNTING, temperature=0, max_tokens=24, stream=True)
    pieces = []
    with pytest.raises(openai.APIError, match="out of memory") as caught:
        for chunk in stream:
            pieces.append(chunk.choices[0].text)
    assert caught.value.code == "compute" and caught.value.type == "server_error"
    # Five body calls succeeded: five tokens arrived before the error, and they are the right ones.
    assert "".join(pieces) == _expected(stack.runtime, _ids(stack.runtime, COUNTING), 5).text
    _idle(stack.body_server)


def test_generation_stops_at_the_step_after_cancel(runtime):
    cancel, pieces = threading.Event(), []

    def on_text(text: str) -> None:
        pieces.append(text)
        if len(pieces) == 3:
            cancel.set()

    ids = _ids(runtime, COUNTING)
    result = runtime.generate_ids(_local_body(), ids, None, SamplingParams(max_new_tokens=50), on_text, cancel=cancel)
    assert result.finish_reasons == ["cancelled"] and 3 <= len(result.token_ids[0]) < 50
    assert result.token_ids[0] == _expected(runtime, ids, len(result.token_ids[0])).token_ids[0]


# --- issue 14: the OpenAI surface ------------------------------------------------------------------


def _post(url: str, path: str, payload: dict, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}{path}", json=payload, headers=headers, timeout=120)


def test_health_needs_no_key_and_models_do(failing, runtime):
    assert httpx.get(f"{failing.url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{failing.url}/v1/models", timeout=10).status_code == 401
    listed = httpx.get(f"{failing.url}/v1/models/smollm2", headers={"Authorization": "Bearer secret"}, timeout=10).json()
    created = int(max(f.stat().st_mtime for f in runtime.opened.checkpoint.files))  # the weights' mtime, not 0
    assert listed == {"id": "smollm2", "object": "model", "created": created, "owned_by": "lambdasplit"}


def test_default_model_name_is_friendly(tmp_path):
    assert default_model_name(None) == "SmolLM2-135M-Instruct"
    assert default_model_name("default") == "SmolLM2-135M-Instruct"
    assert default_model_name("models/qwen2.5-0.5b-instruct-q4_k_m.gguf") == "qwen2.5-0.5b-instruct-q4_k_m"
    assert default_model_name(str(tmp_path / "llama-3.2-1b")) == "llama-3.2-1b"
    assert default_model_name(str(tmp_path / "parts" / "device"), exported=True) == "parts"


def test_unknown_model_is_404(gateway):
    client, _ = gateway
    with pytest.raises(openai.NotFoundError, match="gpt-4o") as caught:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
    assert caught.value.code == "model_not_found"


def test_greedy_chat_equals_the_unsplit_model(gateway, smollm2_dir):
    client, runtime = gateway
    reply = client.chat.completions.create(model="smollm2", messages=MESSAGES, temperature=0, max_tokens=16)
    ids = runtime.encode_chat(MESSAGES)
    unsplit = oracle(smollm2_dir).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    assert reply.choices[0].message.content == runtime.tokenizer.decode(unsplit[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize(
    "change, status, param",
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, 400, "tools"),
        ({"tool_choice": "auto"}, 400, "tool_choice"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, 400, "audio"),
        ({"response_format": {"type": "json_object"}}, 400, "response_format"),
        ({"frobnicate": 1}, 400, "frobnicate"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"temperature": 3}, 400, "temperature"),
        ({"top_p": 0}, 400, "top_p"),
        ({"n": 99}, 400, "n"),
        ({"top_logprobs": 2}, 400, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
        ({"logit_bias": {"999999": 5}}, 400, "logit_bias"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400,
         "messages.0.content.image_url"),
        ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]}, 400, "messages.0.tool"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0"),
        ({"messages": []}, 400, "messages"),
        ({"max_tokens": "many"}, 400, "max_tokens"),
        ({"model": "other"}, 404, "model"),
    ],
)
def test_unsupported_and_invalid_fields_are_openai_errors(stack, change, status, param):
    payload = {"model": "smollm2", "messages": MESSAGES, "max_tokens": 4, **change}
    response = _post(stack.url, "/v1/chat/completions", payload)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param or (error["param"] or "").startswith(param), error


def test_invalid_json_and_completion_fields_are_400(stack):
    response = httpx.post(f"{stack.url}/v1/completions", content=b"{not json", timeout=30)
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    for change, param in [({"suffix": "x"}, "suffix"), ({"best_of": 3}, "best_of"), ({"logprobs": 6}, "logprobs"),
                          ({"echo": True, "logprobs": 1}, "echo"), ({"prompt": [[1, 2], "x"]}, "prompt"), ({"prompt": ""}, "prompt")]:
        response = _post(stack.url, "/v1/completions", {"model": "smollm2", "prompt": "Hi", "max_tokens": 2, **change})
        assert response.status_code == 400 and response.json()["error"]["param"] == param, (change, response.text)


def test_content_parts_and_null_assistant_content(gateway):
    client, runtime = gateway
    messages = [
        {"role": "developer", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": "of France?"}]},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "Answer in one word."},
    ]
    reply = client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=12)
    plain = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is the capital\nof France?"},
             {"role": "assistant", "content": ""}, {"role": "user", "content": "Answer in one word."}]
    assert reply.choices[0].message.content == _expected(runtime, runtime.encode_chat(plain), 12).text


def test_n_choices_are_batch_rows(gateway):
    client, runtime = gateway
    greedy = client.chat.completions.create(model="smollm2", messages=MESSAGES, temperature=0, max_tokens=10, n=2)
    expected = _expected(runtime, runtime.encode_chat(MESSAGES), 10)
    assert [c.index for c in greedy.choices] == [0, 1]
    assert [c.message.content for c in greedy.choices] == [expected.text] * 2
    assert greedy.usage.completion_tokens == 2 * len(expected.token_ids[0])
    assert greedy.usage.prompt_tokens == runtime.encode_chat(MESSAGES).shape[1]
    sampled = client.completions.create(model="smollm2", prompt="Once upon a time", temperature=1.0, max_tokens=12, n=3, seed=5)
    texts = [c.text for c in sampled.choices]
    assert len(texts) == 3 and len(set(texts)) > 1  # sampled rows differ
    # two prompts x n=2: choices in prompt order, each prompt's rows greedy and equal
    both = client.completions.create(model="smollm2", prompt=["The sky is", "Water is"], temperature=0, max_tokens=5, n=2)
    want = [_expected(runtime, _ids(runtime, p), 5).text for p in ("The sky is", "Water is")]
    assert [c.text for c in both.choices] == [want[0], want[0], want[1], want[1]]


def test_streaming_n_and_stop_per_row(gateway):
    client, runtime = gateway
    texts, reasons = {}, {}
    for chunk in client.chat.completions.create(model="smollm2", messages=MESSAGES, temperature=0, max_tokens=16, n=2,
                                                stop=["."], stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    expected = runtime.generate_ids(_local_body(), runtime.encode_chat(MESSAGES), None, SamplingParams(max_new_tokens=16, stop=(".",)))
    assert texts == {0: expected.text, 1: expected.text} and "." not in expected.text
    assert reasons == {0: expected.finish_reasons[0], 1: expected.finish_reasons[0]}


def _raw_logprobs(runtime, ids, n):
    """The unsplit-equivalent local split's raw log-softmax at each of n greedy steps."""
    result = runtime.generate_ids(_local_body(), ids, None, SamplingParams(max_new_tokens=n), keep_logits=True)
    return result, torch.log_softmax(result.logits[:, 0].float(), dim=-1)


def test_chat_logprobs_are_the_models(gateway):
    client, runtime = gateway
    reply = client.chat.completions.create(model="smollm2", messages=MESSAGES, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    result, logprobs = _raw_logprobs(runtime, runtime.encode_chat(MESSAGES), 6)
    content = reply.choices[0].logprobs.content
    assert [runtime.tokenizer.decode([t]) for t in result.token_ids[0]] == [c.token for c in content]
    for step, (entry, token) in enumerate(zip(content, result.token_ids[0], strict=True)):
        assert entry.logprob == pytest.approx(logprobs[step, token].item(), abs=1e-4)
        top = logprobs[step].topk(3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely token
        assert entry.bytes == list(entry.token.encode())
    # streamed: the same entries, chunk by chunk
    streamed = [e for chunk in client.chat.completions.create(model="smollm2", messages=MESSAGES, temperature=0, max_tokens=6,
                                                               logprobs=True, top_logprobs=3, stream=True)
                for c in chunk.choices if c.logprobs for e in c.logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]


def test_completion_logprobs_shape(gateway):
    client, runtime = gateway
    reply = client.completions.create(model="smollm2", prompt="The sky is", temperature=0, max_tokens=4, logprobs=2)
    result, logprobs = _raw_logprobs(runtime, _ids(runtime, "The sky is"), 4)
    lp = reply.choices[0].logprobs
    assert "".join(lp.tokens) == reply.choices[0].text == result.text
    assert lp.token_logprobs == pytest.approx([logprobs[i, t].item() for i, t in enumerate(result.token_ids[0])], abs=1e-4)
    assert all(len(top) == 2 and tok in top for top, tok in zip(lp.top_logprobs, lp.tokens, strict=True))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    echoed = client.completions.create(model="smollm2", prompt="The sky is", temperature=0, max_tokens=4, echo=True)
    assert echoed.choices[0].text == "The sky is" + result.text


def test_openai_penalties_follow_the_formula():
    scores = torch.zeros(1, 6)
    ids = torch.tensor([[5, 5, 1, 1, 1, 3]])  # prompt [5, 5]; generated: 1 three times, 3 once
    out = OpenAIPenalties(prompt_len=2, presence=0.5, frequency=0.25)(ids, scores.clone())
    assert out.tolist() == [[0.0, -(0.5 + 0.75), 0.0, -(0.5 + 0.25), 0.0, 0.0]]  # the prompt's 5 is not penalised


def test_penalties_and_logit_bias_change_the_tokens(gateway):
    client, runtime = gateway
    prompt = COUNTING
    ids = _ids(runtime, prompt)
    plain = _expected(runtime, ids, 16)
    penalised = client.completions.create(model="smollm2", prompt=prompt, temperature=0, max_tokens=16, frequency_penalty=2.0, presence_penalty=1.0)
    want = runtime.generate_ids(_local_body(), ids, None, SamplingParams(max_new_tokens=16, presence_penalty=1.0, frequency_penalty=2.0))
    assert penalised.choices[0].text == want.text != plain.text
    token = runtime.tokenizer.encode(" banana", add_special_tokens=False)[0]
    biased = client.completions.create(model="smollm2", prompt=prompt, temperature=0, max_tokens=3, logit_bias={str(token): 100})
    assert biased.choices[0].text == runtime.tokenizer.decode([token] * 3)


def test_response_format_json_schema(gateway):
    client, _ = gateway
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "is_capital": {"type": "boolean"}},
              "required": ["city", "is_capital"], "additionalProperties": False}
    reply = client.chat.completions.create(
        model="smollm2", temperature=0, max_tokens=48,
        messages=[{"role": "user", "content": "Give the capital of France and its population as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
    )
    assert json.loads(reply.choices[0].message.content) == {"city": "Paris", "is_capital": True}
    assert reply.choices[0].finish_reason == "stop"


@pytest.fixture(scope="module")
def tuned(stack):
    """A gateway whose model defaults (as from generation_config.json) say greedy."""
    with _serving(create_app(stack.runtime, stack.connect, "smollm2", conversations=0,
                             sampling_defaults=SamplingDefaults(temperature=0.0))) as url:
        yield _client(url)


def test_sampling_defaults_come_from_the_generation_config(tuned, runtime):
    assert SamplingDefaults.from_generation_config(GenerationConfig(temperature=0.6, top_p=0.9)) == SamplingDefaults(0.6, 0.9, 0, 1.0)
    assert SamplingDefaults.from_generation_config(GenerationConfig()) == SamplingDefaults()  # transformers' own defaults are not the model's
    reply = tuned.completions.create(model="smollm2", prompt="The sky is", max_tokens=8)  # no temperature: the model's (0) applies
    assert reply.choices[0].text == _expected(runtime, _ids(runtime, "The sky is"), 8).text


def test_sync_and_async_clients_stream_16_concurrent_requests_two_abandoned(stack):
    """16 streaming requests at once (the async client); two clients leave mid-stream; then a new
    request is answered, correctly, and every body session is closed."""
    import asyncio

    prompts = ["The three primary colors are", "My favourite recipe for soup is", COUNTING, "The sky is"]

    async def one(client: openai.AsyncOpenAI, i: int) -> str | None:
        stream = await client.completions.create(model="smollm2", prompt=prompts[i % 4], temperature=0, max_tokens=10, stream=True)
        text = []
        async for chunk in stream:
            text.append(chunk.choices[0].text if chunk.choices else "")
            if i in (3, 7) and len(text) == 2:
                await stream.close()  # this client goes away
                return None
        return "".join(text)

    async def main() -> list[str | None]:
        client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=300)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(16)))
        finally:
            await client.close()

    texts = asyncio.run(main())
    expected = [_expected(stack.runtime, _ids(stack.runtime, p), 10).text for p in prompts]
    for i, text in enumerate(texts):
        assert text == (None if i in (3, 7) else expected[i % 4])
    _idle(stack.body_server)
    reply = stack.client.completions.create(model="smollm2", prompt="The sky is", temperature=0, max_tokens=4)
    assert reply.choices[0].text == _expected(stack.runtime, _ids(stack.runtime, "The sky is"), 4).text


def test_concurrent_seeded_requests_give_their_single_run_answers(stack):
    """Seeded sampled requests in flight together (each draws with its own generator) answer as
    each one does alone, and two seeds differ."""
    import asyncio

    def ask(seed: int) -> str:
        return stack.client.completions.create(model="smollm2", prompt="Once upon a time", temperature=1.2, seed=seed,
                                               max_tokens=12).choices[0].text

    alone = {seed: ask(seed) for seed in (1, 2)}

    async def together() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=300)
        try:
            replies = await asyncio.gather(*(client.completions.create(model="smollm2", prompt="Once upon a time", temperature=1.2,
                                                                        seed=seed, max_tokens=12) for seed in (1, 2, 1, 2)))
        finally:
            await client.close()
        return [r.choices[0].text for r in replies]

    assert asyncio.run(together()) == [alone[1], alone[2], alone[1], alone[2]]
    assert alone[1] != alone[2]


# --- issue 14 part 2: multi-turn reuse ---------------------------------------------------------


@pytest.fixture
def reuse(stack):
    app = create_app(stack.runtime, stack.connect, "smollm2", conversations=2)
    with _serving(app) as url:
        yield SimpleNamespace(url=url, pool=app.state.conversations)
    app.state.conversations.close()


def _turn(url: str, messages: list[dict]) -> httpx.Response:
    response = _post(url, "/v1/chat/completions", {"model": "smollm2", "messages": messages, "temperature": 0, "max_tokens": 12})
    assert response.status_code == 200, response.text
    return response


def test_a_conversations_next_turn_sends_only_its_new_positions(stack, reuse):
    runtime = stack.runtime
    first = [{"role": "user", "content": "What is the capital of France?"}]
    one = _turn(reuse.url, first)
    assert one.headers["x-lambdasplit-cached-tokens"] == "0" and len(reuse.pool) == 1
    answer = one.json()["choices"][0]["message"]["content"]
    second = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And of Italy?"}]

    before = _metrics(stack.body_server)["lambdasplit_tokens_served_total"]
    reused = _turn(reuse.url, second)
    served_reused = _metrics(stack.body_server)["lambdasplit_tokens_served_total"] - before
    before = _metrics(stack.body_server)["lambdasplit_tokens_served_total"]
    fresh = _turn(stack.url, second)  # the same request without reuse
    served_fresh = _metrics(stack.body_server)["lambdasplit_tokens_served_total"] - before

    # What the kept cache held: turn one's prompt and answer but its last token; turn two shares a prefix of it.
    ids1 = runtime.encode_chat(first)[0].tolist()
    held = (ids1 + _expected(runtime, runtime.encode_chat(first), 12).token_ids[0])[:-1]
    ids2 = runtime.encode_chat(second)[0].tolist()
    shared = next((i for i, (a, b) in enumerate(zip(held, ids2, strict=False)) if a != b), min(len(held), len(ids2)))
    assert shared > len(ids1)
    assert int(reused.headers["x-lambdasplit-cached-tokens"]) == shared
    assert reused.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": shared}
    assert served_fresh - served_reused == shared  # the body computed only the new positions
    bytes_reused, bytes_fresh = int(reused.headers["x-lambdasplit-bytes-to-cloud"]), int(fresh.headers["x-lambdasplit-bytes-to-cloud"])
    assert bytes_fresh - bytes_reused == shared * runtime.config.hidden_size * 4  # fp32 hidden states not re-sent
    assert reused.json()["choices"][0]["message"]["content"] == fresh.json()["choices"][0]["message"]["content"]
    # An unrelated conversation does not take the kept one over: it starts its own session.
    other = _turn(reuse.url, [{"role": "user", "content": "Name a colour."}])
    assert other.headers["x-lambdasplit-cached-tokens"] == "0" and len(reuse.pool) == 2


class _Closable:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def _kept(tokens: list[int]) -> Conversation:
    conv = Conversation(_Closable)  # type: ignore[arg-type]
    conv.session()
    conv.cache, conv.tokens, conv.prompt_len = object(), tokens, 3  # type: ignore[assignment]
    return conv


def test_the_conversation_pool_is_lru_with_a_ttl():
    now = [0.0]
    pool: SessionPool[int, Conversation] = SessionPool(2, 10, Conversation.close, clock=lambda: now[0])
    convs = [_kept([1, 2, 3, 4, i]) for i in range(3)]
    bodies = [conv.body for conv in convs]
    for conv in convs:
        pool.put(id(conv), conv)
    assert bodies[0].closed and len(pool) == 2  # the least recently used one was closed
    assert pool.take(lambda c: c.continues([9, 9, 9])) is None  # shares nothing
    assert pool.take(lambda c: c.continues([1, 2])) is None  # does not contain the kept prompt
    taken, shared = pool.take(lambda c: c.continues([1, 2, 3, 4, 2, 7]))
    assert taken is convs[2] and shared == 5 and len(pool) == 1
    now[0] = 11.0
    pool.expire()
    assert bodies[1].closed and len(pool) == 0


def test_a_value_in_use_is_never_evicted_and_a_dropped_one_closes_when_done():
    closed: list[str] = []
    pool: SessionPool[str, str] = SessionPool(1, None, closed.append)
    with pool.use("a", lambda: "A") as a:
        pool.put("b", "B")
        pool.put("c", "C")  # evicts B, the idle one, never A
        assert a == "A" and closed == ["B"] and len(pool) == 2
    with pool.use("a", lambda: "new") as again:  # kept: the same value; A evicted C on its return
        assert again == "A" and closed == ["B", "C"]
        pool.drop("a")
        assert closed == ["B", "C"]  # not under its user
    assert closed == ["B", "C", "A"] and len(pool) == 0


def test_a_repeated_one_token_prompt_starts_a_fresh_cache(reuse, runtime):
    """The kept conversation holds the whole one-token prompt: nothing can be reused (one position
    must be sent), so the turn starts a fresh cache on the kept session instead of failing."""
    want = _expected(runtime, _ids(runtime, "Hello"), 4).text
    for _ in range(2):
        reply = httpx.post(f"{reuse.url}/v1/completions", json={"model": "smollm2", "prompt": "Hello", "max_tokens": 4,
                                                                  "temperature": 0}, timeout=120)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == want


def test_a_stop_string_only_counts_in_generated_text(stack):
    """"\\n\\n" straddling the prompt's last "\\n" and the first new token does not stop (OpenAI's rule)."""
    reply = httpx.post(f"{stack.url}/v1/completions", json={"model": "smollm2", "prompt": "Line one\n", "max_tokens": 8,
                                                              "temperature": 0, "stop": ["\n\n"]}, timeout=120).json()
    choice = reply["choices"][0]
    assert "\n\n" not in choice["text"]
    assert choice["finish_reason"] == "stop" or reply["usage"]["completion_tokens"] == 8


def test_too_many_rows_and_huge_bodies_are_refused(stack):
    rows = httpx.post(f"{stack.url}/v1/completions", json={"model": "smollm2", "prompt": ["a", "b"], "n": 9}, timeout=60)
    assert rows.status_code == 400 and rows.json()["error"]["param"] == "n"
    huge = httpx.post(f"{stack.url}/v1/completions", content=b"{" + b" " * (5 << 20) + b"}",
                      headers={"content-type": "application/json"}, timeout=60)
    assert huge.status_code == 413 and "error" in huge.json()


# --- gateway --pseudonymize / --decoys N -------------------------------------------------------

IDENTIFIED = [{"role": "user", "content": "My name is Margaret Okafor and my email is m.okafor@brightmail.net. "
                                          "Write a short e-mail greeting to me."}]
REAL_IDS = ["Margaret", "Okafor", "m.okafor@brightmail.net"]
MESSAGES_WITH_NAME = [{"role": "system", "content": "You are terse."},
                      {"role": "user", "content": "What is the capital of France? Margaret Okafor asks."}]


@pytest.fixture(scope="module")
def protected(stack):
    """Gateways with the defenses (seeded ones, and one drawing stand-ins as in use), with multi-turn
    reuse on (protected requests must not use it); every body session they open keeps its frames."""
    sessions: list = []

    def connect():
        body = stack.connect()
        body.captured = []
        sessions.append(body)
        return body

    apps = {name: create_app(stack.runtime, connect, "smollm2", conversations=2, protection=protection)
            for name, protection in (("pseudonymize", Protection(pseudonymize=True, seed=0)), ("decoys", Protection(decoys=2, seed=1)),
                                     ("unseeded", Protection(pseudonymize=True)))}
    with contextlib.ExitStack() as servers:
        urls = {name: servers.enter_context(_serving(app)) for name, app in apps.items()}
        yield SimpleNamespace(urls=urls, apps=apps, sessions=sessions, runtime=stack.runtime, connect=stack.connect,
                              plain=stack.client, clients={name: _client(url) for name, url in urls.items()})


def _chat(client: openai.OpenAI, messages: list[dict], stream: bool = False, **kw) -> tuple[str, str, object]:
    """(text, finish_reason, usage) of a greedy chat answer, streamed or not."""
    kw = {"model": "smollm2", "messages": messages, "temperature": 0, "max_tokens": 16, **kw}
    if not stream:
        reply = client.chat.completions.create(**kw)
        return reply.choices[0].message.content, reply.choices[0].finish_reason, reply.usage
    pieces, reasons, usage = [], [], None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            reasons += [choice.finish_reason] if choice.finish_reason else []
    assert len(reasons) == 1
    return "".join(pieces), reasons[0], usage


def _uplink(body) -> list[torch.Tensor]:
    """The hidden states the cloud received from one body session, frame by frame."""
    return observe(body.captured).uplink


def _direct(protected, protection: Protection, messages: list[dict], tokens: int = 16, **sampling):
    """ProtectedChat run directly on a body session of the same server, and that session's frames."""
    body = protected.connect()
    body.captured = []
    try:
        done = ProtectedChat(protected.runtime, protection).generate(body, messages, SamplingParams(max_new_tokens=tokens, **sampling))
    finally:
        body.close()
    return done, _uplink(body)


def test_pseudonymize_answers_as_protected_chat_and_sends_only_stand_ins(protected):
    """The greedy answer equals ProtectedChat's for the same seed, with the real identifiers restored;
    the cloud received exactly the hidden states of ProtectedChat's prompt, which holds none of them
    (the inversion attack recovers that prompt: tests/test_pseudonym.py)."""
    text, reason, usage = _chat(protected.clients["pseudonymize"], IDENTIFIED)
    sent = _uplink(protected.sessions[-1])
    done, direct = _direct(protected, Protection(pseudonymize=True, seed=0), IDENTIFIED)
    assert text == done.text and reason == done.result.finish_reasons[0]
    assert "Margaret Okafor" in text and not any(r in done.sent_text for r in REAL_IDS)  # the model wrote stand-ins; restored
    assert usage.prompt_tokens == len(done.result.prompt_token_ids[0]) and usage.completion_tokens == len(done.token_ids)
    assert len(sent) == len(direct) and all(torch.equal(a, b) for a, b in zip(sent, direct, strict=True))
    assert not any(r in done.cloud_prompt for r in REAL_IDS) and "Write a short e-mail greeting" in done.cloud_prompt
    plain = _uplink_of_plain(protected, IDENTIFIED)
    assert sent[0].shape != plain.shape or not torch.equal(sent[0], plain)  # not what the undefended request sends
    assert len(protected.apps["pseudonymize"].state.conversations) == 0  # no kept KV: the cloud holds the stand-ins' prompt


def _uplink_of_plain(protected, messages: list[dict]) -> torch.Tensor:
    """The prompt's hidden states as an undefended request sends them."""
    body = protected.connect()
    body.captured = []
    try:
        protected.runtime.generate_ids(body, protected.runtime.encode_chat(messages), None, SamplingParams(max_new_tokens=1))
    finally:
        body.close()
    return _uplink(body)[0]


@pytest.mark.parametrize("name", ["pseudonymize", "decoys"])
def test_protected_streamed_chunks_join_to_the_answer(protected, name):
    client, tokens = protected.clients[name], 16 if name == "pseudonymize" else 8
    assert _chat(client, IDENTIFIED, stream=True, max_tokens=tokens)[:2] == _chat(client, IDENTIFIED, max_tokens=tokens)[:2]


def test_decoys_run_a_batch_of_three_and_return_the_undefended_answer(protected):
    text, reason, usage = _chat(protected.clients["decoys"], MESSAGES_WITH_NAME, max_tokens=12)
    sent = _uplink(protected.sessions[-1])
    plain = protected.plain.chat.completions.create(model="smollm2", messages=MESSAGES_WITH_NAME, temperature=0, max_tokens=12)
    assert sent[0].shape[0] == 3 and not any(torch.equal(sent[0][i], sent[0][j]) for i, j in ((0, 1), (0, 2), (1, 2)))  # real + 2 decoys
    assert text == plain.choices[0].message.content and reason == plain.choices[0].finish_reason == "stop"
    assert (usage.prompt_tokens, usage.completion_tokens) == (plain.usage.prompt_tokens, plain.usage.completion_tokens)
    assert usage.completion_tokens < 12 and len(sent) == 12  # the real row ended; every row ran to max_tokens
    # a stop string cuts the real row's answer as it would the undefended one, and the batch still runs to the end
    text, reason, usage = _chat(protected.clients["decoys"], MESSAGES_WITH_NAME, max_tokens=12, stop=["Paris"])
    plain = protected.plain.chat.completions.create(model="smollm2", messages=MESSAGES_WITH_NAME, temperature=0, max_tokens=12,
                                                    stop=["Paris"])
    assert (text, reason, usage.completion_tokens) == (plain.choices[0].message.content, "stop", plain.usage.completion_tokens)
    assert len(_uplink(protected.sessions[-1])) == 12


def test_a_conversations_next_turn_keeps_its_stand_ins(protected):
    """Stand-ins drawn as in use (no seed): the second turn (same opening) reuses the first turn's
    ProtectedChat, so the cloud's hidden states of the shared prefix are the same; another opening
    gets its own."""
    client, chats = protected.clients["unseeded"], protected.apps["unseeded"].state.protected
    first, _, _ = _chat(client, IDENTIFIED)
    one = _uplink(protected.sessions[-1])[0]
    with chats.chat(IDENTIFIED) as chat:
        stand_in = chat.pseudonymizer.stand_ins.get("PERSON", "Margaret Okafor")
    second = IDENTIFIED + [{"role": "assistant", "content": first}, {"role": "user", "content": "Sign it from Margaret Okafor."}]
    _chat(client, second)
    two = _uplink(protected.sessions[-1])[0]
    assert two.shape[1] > one.shape[1] and torch.allclose(two[:, : one.shape[1]], one, atol=1e-4)
    with chats.chat(second) as again:
        assert again is chat and again.pseudonymizer.stand_ins.get("PERSON", "Margaret Okafor") == stand_in
    kept = len(chats)
    _chat(client, [{"role": "user", "content": "Who is Margaret Okafor?"}])
    assert len(chats) == kept + 1 and len(protected.apps["unseeded"].state.conversations) == 0
    for user in ("alice", "bob"):  # the same opening from two end users: two mappings
        _chat(client, [{"role": "user", "content": "Who is Margaret Okafor?"}], max_tokens=2, user=user)
    assert len(chats) == kept + 3


def test_a_decoy_conversations_second_turn_gives_each_row_its_own_answer_cut_at_the_stop(protected):
    """The client keeps the answer up to its stop string; in the next turn every row's history is
    that row's own first answer cut at its own first stop, as a client of that row would keep it."""
    client, chats = protected.clients["decoys"], protected.apps["decoys"].state.protected
    opening = [{"role": "user", "content": "Margaret Okafor asks: name three French cities."}]
    first, reason, usage = _chat(client, opening, max_tokens=12, stop=[" of"])
    assert reason == "stop"
    follow = [*opening, {"role": "assistant", "content": first}, {"role": "user", "content": "And Italian ones?"}]
    with chats.chat(follow) as chat:
        batch = chat.prepare(follow)  # the history is known: no DecoyHistoryError
    assert batch.rows[batch.real_row][1]["content"] == first
    decoys = [row[1]["content"] for i, row in enumerate(batch.rows) if i != batch.real_row]
    assert len(decoys) == 2 and all(d != first and " of" not in d for d in decoys)  # each cut at its own first stop


def test_a_stop_string_naming_a_real_identifier_stops_the_restored_answer(protected):
    """The model writes the stand-in (it never writes "Margaret": the first test), so the stop is
    matched on the restored text the client reads."""
    client = protected.clients["pseudonymize"]
    full, _, full_usage = _chat(client, IDENTIFIED)
    stop = "Sender: Margaret"
    assert stop in full
    for stream in (False, True):
        text, reason, usage = _chat(client, IDENTIFIED, stream=stream, stop=[stop])
        assert (text, reason) == (full[: full.index(stop)], "stop")
        assert usage.completion_tokens < full_usage.completion_tokens


def test_protected_sampling_fields_pass_through(protected):
    client = protected.clients["pseudonymize"]
    penalised, _, _ = _chat(client, IDENTIFIED, frequency_penalty=2.0, presence_penalty=1.0, max_tokens=10)
    done, _ = _direct(protected, Protection(pseudonymize=True, seed=0), IDENTIFIED, 10, presence_penalty=1.0, frequency_penalty=2.0)
    assert penalised == done.text != _chat(client, IDENTIFIED, max_tokens=10)[0]
    sampled = [_chat(client, IDENTIFIED, temperature=1.0, seed=3, max_tokens=6)[0] for _ in range(2)]
    assert sampled[0] == sampled[1]


@pytest.mark.parametrize("name", ["pseudonymize", "decoys"])
@pytest.mark.parametrize("path, change, param", [
    ("/v1/chat/completions", {"n": 2}, "n"),
    ("/v1/chat/completions", {"logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 2}, "logprobs"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
     "response_format"),
    ("/v1/completions", {"prompt": "Hi"}, "prompt"),
])
def test_protected_requests_refuse_what_they_cannot_honour(protected, name, path, change, param):
    payload = {"model": "smollm2", "max_tokens": 4, **({} if path == "/v1/completions" else {"messages": IDENTIFIED}), **change}
    response = _post(protected.urls[name], path, payload)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, "unsupported_parameter", "invalid_request_error")
    assert ("--pseudonymize" if name == "pseudonymize" else "--decoys 2") in error["message"]
    if name == "decoys" and param == "n":
        assert "--decoys uses the batch's rows" in error["message"]


def test_protected_conversations_are_lru_with_a_ttl(runtime):
    now = [0.0]
    chats = ProtectedChats(runtime, Protection(pseudonymize=True, seed=0), capacity=2, ttl=10, clock=lambda: now[0])
    opening = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi Anna Schmidt."}]
    seen = []
    for messages in (opening, opening + [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "More."}],
                     [{"role": "user", "content": "Other."}]):
        with chats.chat(messages) as chat:
            seen.append(chat)
    assert seen[0] is seen[1] is not seen[2] and len(chats) == 2
    with chats.chat([{"role": "user", "content": "Third."}]):
        pass
    with chats.chat(opening) as chat:  # the least recently used one was forgotten
        assert chat is not seen[0]
    now[0] = 11.0
    chats.expire()
    assert len(chats) == 0


def test_a_decoy_turn_whose_history_the_gateway_did_not_generate_is_refused(protected):
    """Under --decoys each row's history must be its own earlier answers; an answer the gateway never
    gave (an edited history, or one it no longer holds) would show the cloud the real row: a 400."""
    edited = [*MESSAGES_WITH_NAME, {"role": "assistant", "content": "Paris, of course."}, {"role": "user", "content": "Why?"}]
    response = _post(protected.urls["decoys"], "/v1/chat/completions", {"model": "smollm2", "max_tokens": 4, "messages": edited})
    assert response.status_code == 400, response.text
    assert "not an answer this conversation generated" in response.json()["error"]["message"]


def test_the_user_field_keeps_two_users_conversations_apart(runtime):
    chats = ProtectedChats(runtime, Protection(pseudonymize=True))
    opening = [{"role": "user", "content": "Hi, I am Anna Schmidt."}]
    seen = []
    for user in ("alice", "bob", "alice"):
        with chats.chat(opening, user) as chat:
            seen.append(chat)
    assert seen[0] is seen[2] and seen[0] is not seen[1]


# The JSON the gateway is fuzzed with: any value, text with lone surrogates and control characters
# (valid JSON escapes that are not valid Unicode text), NaN and infinities (which json.loads accepts).
_TEXT = st.text(st.characters(exclude_categories=()), max_size=12) | st.sampled_from(["hi", "\ud800", "a\udfffb", "\x00", ""])
_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | _TEXT,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3), max_leaves=8)
_PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "refusal", "input_audio", "file"]) | _JSON},
                              optional={"text": _TEXT | _JSON, "refusal": _JSON, "image_url": _JSON})
_CONTENT = _TEXT | st.none() | st.lists(_PART | _JSON, max_size=3) | _JSON
_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "function"]) | _JSON},
                                 optional={"content": _CONTENT, "name": _TEXT | _JSON, "tool_call_id": _TEXT, "refusal": _JSON})
_CHAT_CHANGE = st.dictionaries(
    st.sampled_from(["model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "stream", "stream_options",
                     "seed", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "response_format",
                     "user", "tools", "prompt", "echo", "best_of", "suffix"]) | _TEXT, _JSON, max_size=2)


@pytest.fixture(scope="module")
def fuzzed(runtime):
    """Apps whose body fails its first call (a valid request runs up to it, then ends in a 503), plain and pseudonymising."""
    from fastapi.testclient import TestClient

    def connect():
        return _FailingBody(UnavailableError("no body server in the fuzz test"))

    apps = [create_app(runtime, connect, "smollm2", conversations=0),
            create_app(runtime, connect, "smollm2", protection=Protection(pseudonymize=True, seed=0))]
    with TestClient(apps[0], raise_server_exceptions=False) as plain, TestClient(apps[1], raise_server_exceptions=False) as protected:
        yield plain, protected


def _fuzz_post(fuzzed, path: str, payload: bytes) -> None:
    for client in fuzzed:
        response = client.post(path, content=payload, headers={"Content-Type": "application/json"})
        assert response.status_code in (400, 404, 503), (path, payload, response.status_code, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and "\n" not in error["message"], error


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(messages=st.lists(_MESSAGE, max_size=3) | _JSON, change=_CHAT_CHANGE)
def test_fuzzed_chat_json_never_gets_a_500(fuzzed, messages, change):
    """Any JSON request: a 400 (404 for another model) in OpenAI's error shape, or a 503 from the body
    that a valid request reaches; never a 500 with a traceback."""
    payload = {"model": "smollm2", "messages": messages, "max_tokens": 2, **change}
    _fuzz_post(fuzzed, "/v1/chat/completions", json.dumps(payload).encode())


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(prompt=_JSON, change=_CHAT_CHANGE, raw=st.none() | st.binary(max_size=40) | _JSON)
def test_fuzzed_completion_json_and_raw_bodies_never_get_a_500(fuzzed, prompt, change, raw):
    payload = {"model": "smollm2", "prompt": prompt, "max_tokens": 2, **change} if raw is None else raw
    encoded = raw if isinstance(raw, bytes) else json.dumps(payload).encode()
    _fuzz_post(fuzzed, "/v1/completions", encoded)
    _fuzz_post(fuzzed, "/v1/chat/completions", encoded)


_USER_HI = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    "path, payload, param, message",
    [  # what the 2026-12-05 fuzz run answered with a 500 and a tokenizer traceback, and content shapes OpenAI's types refuse
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages.0.content", "lone surrogate"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
         "messages.0.content.0.text", "lone surrogate"),
        ("/v1/chat/completions", {"messages": [_USER_HI], "\ud800": 1}, None, "a field name is not valid Unicode"),
        ("/v1/chat/completions", {"messages": [_USER_HI], "model": "\ud800"}, "model", "lone surrogate"),
        ("/v1/completions", {"prompt": ["ok", "\ud800"]}, "prompt.1", "lone surrogate"),
        ("/v1/chat/completions", {"messages": [_USER_HI], "response_format": {"type": "json_schema", "json_schema": {
            "name": "deep", "schema": json.loads('{"a":' * 80 + "1" + "}" * 80)}}}, "response_format", "nested more than 64"),
        ("/v1/chat/completions", {"messages": "hi"}, "messages", "must be a list of message objects, got a string"),
        ("/v1/chat/completions", {"messages": [5]}, "messages.0", "must be a message object, got a number"),
        ("/v1/chat/completions", {"messages": [{"role": ["user"], "content": "hi"}]}, "messages.0.role", "got a list"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content",
         "must be a string or a list of content parts, got a number"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": {"type": "text", "text": "hi"}}]}, "messages.0.content",
         "got an object"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, "messages.0.content", "must not be null"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": ["hi"]}]}, "messages.0.content.0", "got a string"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"text": "hi"}]}]}, "messages.0.content.0.type", "got null"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
         "messages.0.content.0.text", "must be a string, got a number"),
        ("/v1/chat/completions", {"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages.0.content.0.type", "must be one of 'text' in a system message, got a string 'image_url'"),
        ("/v1/chat/completions", {"messages": [{"role": "function", "name": "f", "content": ["hi"]}]}, "messages.0.content",
         "must be a string, got a list"),
        ("/v1/chat/completions", {"messages": [_USER_HI], "seed": -1}, "seed", "`seed` must be from 0"),
    ],
)
def test_malformed_content_and_text_are_400s_naming_the_field(fuzzed, path, payload, param, message):
    for client in fuzzed if path == "/v1/chat/completions" else fuzzed[:1]:  # the pseudonymising one refuses raw prompts
        response = client.post(path, content=json.dumps({"model": "smollm2", "max_tokens": 2, **payload}).encode())
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and message in error["message"] and error["type"] == "invalid_request_error", error


def test_a_body_nested_deeper_than_json_can_parse_is_400(fuzzed):
    payload = b'{"model": "smollm2", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = fuzzed[0].post("/v1/chat/completions", content=payload)
    assert response.status_code == 400 and response.json()["error"]["message"] == "the request body is nested too deeply"


def test_a_gateway_drafting_trees_streams_the_plain_answer_and_keeps_the_conversation(stack):
    """--speculate draft-tree: the streamed text is greedy decoding's, and a finished turn keeps its
    body session for the next (the tree's tokens reach the gateway's stream collector)."""
    runtime = stack.runtime
    app = create_app(runtime, stack.connect, "smollm2", speculate="draft-tree", conversations=2)
    with _serving(app) as url:
        stream = _client(url).chat.completions.create(model="smollm2", messages=MESSAGES, temperature=0, max_tokens=24, stream=True)
        pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
        expected = _expected(runtime, runtime.encode_chat(MESSAGES), 24)
        assert "".join(pieces) == expected.text and len(pieces) > 2
        first = [{"role": "user", "content": "What is the capital of France?"}]
        answer = _turn(url, first).json()["choices"][0]["message"]["content"]
        second = _turn(url, first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And of Italy?"}])
        assert int(second.headers["x-lambdasplit-cached-tokens"]) > runtime.encode_chat(first).shape[1]
        want = _expected(runtime, runtime.encode_chat(first + [{"role": "assistant", "content": answer},
                                                               {"role": "user", "content": "And of Italy?"}]), 12)
        assert second.json()["choices"][0]["message"]["content"] == want.text
    app.state.conversations.close()

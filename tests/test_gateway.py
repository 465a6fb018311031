"""The OpenAI-compatible gateway, driven by the official `openai` client, against a real body server."""

from __future__ import annotations

import socket
import threading
import time

import openai
import pytest
import uvicorn

from lambdasplit.cloud.process import ServerProcess
from lambdasplit.device.body import load_local_body
from lambdasplit.device.remote import RemoteBody
from lambdasplit.device.runtime import SplitDevice
from lambdasplit.device.sampling import SamplingConfig
from lambdasplit.gateway.app import create_app

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def gateway(smollm2_dir):
    with ServerProcess("--split", "2,2") as body_server:
        device = SplitDevice.load(None, (2, 2))
        body = RemoteBody(body_server.url, device.manifest)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(device, body, "smollm2"), port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused"), device
        server.should_exit = True
        thread.join(timeout=10)
        body.close()


def _expected(device, ids, n):
    return device.generate_ids(load_local_body(None, (2, 2)), ids, None, SamplingConfig(max_new_tokens=n))


def test_models(gateway):
    client, _ = gateway
    assert [m.id for m in client.models.list().data] == ["smollm2"]


def test_chat_completion_matches_the_split_model(gateway):
    client, device = gateway
    reply = client.chat.completions.create(model="smollm2", messages=MESSAGES, temperature=0, max_tokens=24)
    expected = _expected(device, device.encode_chat(MESSAGES), 24)
    assert reply.choices[0].message.content == expected.text
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage.prompt_tokens == device.encode_chat(MESSAGES).shape[1]
    assert reply.usage.completion_tokens == len(expected.token_ids[0])
    assert reply.choices[0].finish_reason == expected.finish_reasons[0]


def test_streaming_chat_with_usage(gateway):
    client, device = gateway
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
    expected = _expected(device, device.encode_chat(MESSAGES), 24)
    assert "".join(pieces) == expected.text and len(pieces) > 2
    assert usage is not None and usage.completion_tokens == len(expected.token_ids[0])
    assert reasons == [expected.finish_reasons[0]]


def test_completions_streaming_and_not(gateway):
    client, device = gateway
    prompt = "The three primary colors are"
    plain = client.completions.create(model="smollm2", prompt=prompt, temperature=0, max_tokens=12)
    ids, _ = device.encode(prompt, raw=True)
    assert plain.choices[0].text == _expected(device, ids, 12).text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2", prompt=prompt, temperature=0, max_tokens=12, stream=True) if c.choices)
    assert streamed == plain.choices[0].text


def test_bad_request_gets_a_clear_error(gateway):
    client, _ = gateway
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "  "}], max_tokens=4)

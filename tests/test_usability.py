"""Defects a new user met trying the product (issue 21 item 14), each checked where it was found."""

from __future__ import annotations

import pytest
import torch

from lambdasplit.device.remote import RemoteBody
from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.device.sampling import SamplingParams
from lambdasplit.engine.loading import load_scheduler
from lambdasplit.engine.scheduler import SchedulerLimits
from lambdasplit.errors import LambdaSplitError, MismatchError, PromptError
from lambdasplit.wire.codec import Codec
from tests.test_server_hardening import TOKEN, ThreadServer


@pytest.fixture(scope="module")
def bodies(llama):
    return load_scheduler(str(llama), (2, 2)).bodies


def _remote(server: ThreadServer, runtime: SplitRuntime) -> RemoteBody:
    return RemoteBody(server.url, runtime.manifest, Codec.FP32, token=TOKEN)


def test_the_servers_context_defaults_to_the_models_window(llama, bodies):
    """It was 4096 whatever the model (SmolLM2's window is 8192); the tiny model's is 256."""
    server = ThreadServer(bodies)
    runtime = SplitRuntime.load(llama, (2, 2))
    body = _remote(server, runtime)
    try:
        assert server.scheduler.limits.max_context == runtime.config.max_position_embeddings == 256
        assert body.context_limit() == 256  # announced in WELCOME
    finally:
        body.close()
        server.close()


def test_a_prompt_over_the_servers_max_context_fails_before_any_hidden_state_is_sent(llama, bodies):
    """With prompts sent in chunks the server refused only the chunk that crossed --max-context,
    after prefilling the ones before it (18 s of a long prompt); now the device checks first."""
    server = ThreadServer(bodies, SchedulerLimits(max_context=16, max_frame_positions=4))
    runtime = SplitRuntime.load(llama, (2, 2))
    body = _remote(server, runtime)
    try:
        with pytest.raises(PromptError, match="prompt of 14 tokens \\+ 4 new tokens exceeds the body server's --max-context of 16"):
            runtime.generate_ids(body, torch.arange(1, 15).unsqueeze(0), None, SamplingParams(max_new_tokens=4))
        assert body.stats.bytes_to_cloud == 0 and server.metric("lambdasplit_tokens_served_total") == 0
        result = runtime.generate_ids(body, torch.arange(1, 13).unsqueeze(0), None, SamplingParams(max_new_tokens=4))
        assert len(result.token_ids[0]) <= 4
    finally:
        body.close()
        server.close()


def test_a_text_device_at_an_image_server_and_the_reverse_are_told_what_each_serves(llama, bodies):
    """It said "malformed pipeline manifest: family is missing"."""
    from lambdasplit.diffusion.cloud import load_diffusion_scheduler
    from lambdasplit.diffusion.device import SplitPipeline

    runtime = SplitRuntime.load(llama, (2, 2))
    with ThreadServer(load_diffusion_scheduler(None, "paper", 1).bodies) as image, ThreadServer(bodies) as text:
        with pytest.raises(MismatchError, match="this server serves a diffusion pipeline, but the device holds a language "
                                                "model; point the device at a server started with `lambdasplit serve --model"):
            _remote(image, runtime).frame_positions()
        pipeline = SplitPipeline.load(None, "paper", 1, server=text.url, token=TOKEN)
        with pytest.raises(MismatchError, match="this server serves a language model, but the device holds a diffusion "
                                                "pipeline; .* `lambdasplit serve --pipeline`"):
            pipeline.generate("a fox", 1)
        pipeline.close()


def test_a_tls_name_mismatch_lists_the_names_the_certificate_has(bodies, llama, tmp_path):
    """The hint suggested wss://localhost:PORT for a certificate that does not list localhost."""
    from lambdasplit.security import make_certificates, server_ssl_context

    paths = make_certificates(tmp_path, ["body.example.org", "10.1.2.3"])
    runtime = SplitRuntime.load(llama, (2, 2))
    with ThreadServer(bodies, tls=server_ssl_context(paths["cert"], paths["key"])) as server:
        body = RemoteBody(server.url, runtime.manifest, Codec.FP32, token=TOKEN, tls_ca=paths["ca"])
        with pytest.raises(LambdaSplitError) as refused:
            body.frame_positions()
    message = str(refused.value)
    assert f"the certificate is for body.example.org, 10.1.2.3: connect with one of those (wss://NAME:{server.port})" in message
    assert "localhost" not in message and "\n" not in message


def test_generate_reads_the_prompt_from_stdin_or_a_file(llama, tmp_path):
    import json
    import os
    import subprocess
    import sys

    prompt = "A prompt with \"quotes\", $dollars and\na second line"
    (tmp_path / "prompt.txt").write_text(prompt + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, "-m", "lambdasplit.cli", "generate", "--model", str(llama), "-n", "2", "--json", "--raw"]
    ids = []
    for args, stdin in (([prompt], None), (["-"], prompt + "\n"), (["--prompt-file", str(tmp_path / "prompt.txt")], None)):
        proc = subprocess.run([*base, *args], input=stdin, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        ids.append(json.loads(proc.stdout)["prompt_token_ids"])
    assert ids[0] == ids[1] == ids[2] and len(ids[0]) > 10


def test_the_gateway_answers_unknown_routes_in_openais_shape_and_dates_its_model(llama):
    from fastapi.testclient import TestClient

    from lambdasplit.gateway.app import create_app

    runtime = SplitRuntime.load(llama, (2, 2))
    client = TestClient(create_app(runtime, lambda: None, "tiny", conversations=0))
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405)):
        response = client.request(method, path)
        assert response.status_code == status
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] is None and error["code"] is None
        assert error["message"].endswith(f"({method} {path})")
    assert client.get("/v1/nothing").json()["error"]["message"] == "Invalid URL (GET /v1/nothing)"
    assert client.get("/v1/chat/completions").headers["allow"] == "POST"
    created = client.get("/v1/models").json()["data"][0]["created"]
    assert created == int((llama / "model.safetensors").stat().st_mtime) > 0
    assert client.get("/v1/models/tiny").json()["created"] == created


def test_quick_benchmark_results_go_where_git_ignores_them():
    """`benchmarks cpu --quick` rewrote the committed benchmarks/results/cpu-quick.json."""
    import subprocess

    from benchmarks.common import RESULTS, results_dir

    def ignored(path) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=RESULTS.parent).returncode == 0

    assert results_dir(False) == RESULTS and results_dir(True, RESULTS) == RESULTS
    assert ignored(results_dir(True) / "cpu-quick.json") and ignored(results_dir(True) / "serve-cpu-quick.png")
    assert not ignored(RESULTS / "cpu-quick.json")


@pytest.mark.parametrize("args", [["--help"], ["generate", "--help"], ["serve", "--help"]])
def test_help_imports_neither_torch_nor_transformers(args):
    """`lambdasplit --help` took 3 s (6-8 s on a loaded machine): the package imported torch and
    transformers up front, and the app's callback imported transformers to quiet it. Now 0.2-0.4 s."""
    import subprocess
    import sys

    code = ("import sys\nfrom lambdasplit.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert "Usage:" in proc.stdout and proc.stdout.splitlines()[-1] == "[]", proc.stdout + proc.stderr


def test_image_dtype_help_speaks_of_the_diffusion_parts():
    """`image --help` showed the language models' --dtype text (GGUF exports, --quantize): diffusion has neither."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": "250"}
    shown = subprocess.run([sys.executable, "-m", "lambdasplit", "image", "--help"], capture_output=True, text=True, env=env,
                           timeout=120).stdout
    text = " ".join(line.strip("│ ") for line in shown.splitlines()[next(i for i, x in enumerate(shown.splitlines()) if "--dtype" in x):])
    dtype = text[text.index("--dtype"):text.index("--device")]
    assert "gguf" not in dtype.lower() and "--quantize" not in dtype
    assert "text encoders" in dtype and "UNet" in dtype and "float32" in dtype


def test_help_after_double_dash_is_an_argument():
    from lambdasplit.cli import _asks_for_help

    assert _asks_for_help(["generate", "--help"]) and not _asks_for_help(["generate", "--", "--help"])
    assert not _asks_for_help(["generate", "hello"])


def test_the_gguf_conversion_says_each_step_before_it_runs(tmp_path, monkeypatch):
    """16 s passed between "converting ..." and the tensor bar with nothing on screen."""
    import logging

    import transformers

    from lambdasplit.split import sources

    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logger = logging.getLogger("lambdasplit.progress")
    logger.addHandler(handler)
    monkeypatch.setattr(logger, "level", logging.INFO)
    steps: list[tuple[str, list[str]]] = []

    def step(name):
        def load(*args, **kwargs):
            steps.append((name, said[1:]))
            if name == "model":
                raise ValueError("stop here")
        return load

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", step("tokenizer"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", step("model"))
    monkeypatch.setenv("LAMBDASPLIT_CACHE", str(tmp_path))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    try:
        with pytest.raises(LambdaSplitError, match="not a readable GGUF model"):
            sources.converted_gguf(gguf)
    finally:
        logger.removeHandler(handler)
    tokenizer, weights = "reading the tokenizer of model.gguf ...", "reading the weights of model.gguf (every tensor is dequantized to float32) ..."
    assert said[0].startswith("converting model.gguf to safetensors")
    assert steps == [("tokenizer", [tokenizer]), ("model", [tokenizer, weights])]

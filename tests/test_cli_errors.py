"""Bad invocations of the CLI: each is one `error: ...` line on stderr, exit status 2, no traceback.

The table runs as real subprocesses, started together (most fail before any model loads), so the
file stays fast. serve's option checks run in this process too, where torchrun's relaunch and the
compile backend can be replaced: every bad combination is refused before `--tensor-parallel`
starts torchrun, and `--compile` with a compiler that fails stops start-up with one line. The rest
covers serve's --help and README synopsis, ServerProcess's start-up timeout, the audit's progress
units, the GGUF conversion notice and the chat-template warning."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

CLI = [sys.executable, "-m", "lambdasplit.cli"]
TINY_CONFIG = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 8, "intermediate_size": 16,
               "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 32}


def _model_dir(root: Path, name: str, config: str, weights: bytes | None = None) -> Path:
    directory = root / name
    directory.mkdir()
    (directory / "config.json").write_text(config)
    good = directory / "model.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(32, 8)}, str(good))
    if weights is not None:
        good.write_bytes(weights)
    return directory


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad")
    config = json.dumps(TINY_CONFIG)
    valid = _model_dir(root, "valid", config)
    whole = (valid / "model.safetensors").read_bytes()
    (root / "token.bin").write_bytes(b"\xff\xfe\xfa not utf-8 at all, long enough")
    (root / "bad.gguf").write_bytes(b"GGUF" + b"\x00junk" * 2)
    (root / "a-file").write_text("not a directory")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    part = root / "device-part"
    part.mkdir()
    (part / "manifest.json").write_text(json.dumps({
        "role": "device", "model_type": "llama", "fingerprint": "ab" * 32, "layers": 3, "hidden_size": 8, "head": [0, 1],
        "body": [1, 2], "tail": [2, 3], "dtype": "float32", "files": {}, "format_version": 2}))
    return {
        "device_part": str(part),
        "valid": str(valid),
        "corrupt": str(_model_dir(root, "corrupt", config, os.urandom(64))),
        "truncated": str(_model_dir(root, "truncated", config, whole[: len(whole) // 2])),
        "badjson": str(_model_dir(root, "badjson", "{")),
        "badfield": str(_model_dir(root, "badfield", json.dumps({**TINY_CONFIG, "num_hidden_layers": "x"}))),
        "gguf": str(root / "bad.gguf"),
        "token": str(root / "token.bin"),
        "unwritable": str(root / "a-file" / "certs"),
        "taken": str(listener.getsockname()[1]),
        "cache": str(root / "cache"),
        "_listener": listener,  # kept open (and alive) for the module
    }


CASES = {
    "corrupt safetensors": (["info", "--model", "{corrupt}"], "not a readable safetensors file"),
    "truncated safetensors": (["info", "--model", "{truncated}"], "may be truncated or corrupt"),
    "config not JSON": (["info", "--model", "{badjson}"], "not a valid JSON file"),
    "config field of the wrong type": (["info", "--model", "{badfield}"], "num_hidden_layers"),
    "corrupt gguf": (["info", "--model", "{gguf}"], "not a readable GGUF model"),
    "non-UTF-8 prompt": (["generate", b"caf\xe9 au lait"], "not valid UTF-8"),
    "non-UTF-8 token file": (["generate", "hi", "--token-file", "{token}"], "is not UTF-8 text"),
    "unparsable server URL": (["generate", "hi", "--server", "ws://[bad"], "not a valid URL"),
    "server URL of the wrong scheme": (["generate", "hi", "--server", "http://host:1"], "expected ws://HOST:PORT"),
    "gateway server URL": (["gateway", "--server", "ws://[bad"], "not a valid URL"),
    "port too large": (["serve", "--port", "99999"], "'--port'"),
    "negative port": (["serve", "--port", "-1"], "'--port'"),
    "port in use": (["serve", "--port", "{taken}"], "already in use"),
    "gateway port in use": (["gateway", "--server", "ws://127.0.0.1:1", "--port", "{taken}"], "already in use"),
    "ui port in use": (["ui", "--port", "{taken}"], "already in use"),
    "zero sessions": (["serve", "--max-sessions", "0"], "'--max-sessions'"),
    "negative context": (["serve", "--max-context", "-1"], "'--max-context'"),
    "negative TTL": (["serve", "--session-ttl", "-5"], "-5 is not a positive number"),
    "negative noise": (["generate", "hi", "--noise", "-1"], "-1 is not a positive number"),
    "negative K": (["generate", "hi", "--split", "-1,2"], "'-1,2': expected K,M or KMIN-KMAX,M"),
    "negative K (info)": (["info", "--split", "-1,2"], "'-1,2': expected K,M"),
    "negative K (audit)": (["audit", "--split", "2,-2"], "'2,-2': expected K,M"),
    "certs into a file": (["certs", "--out", "{unwritable}"], "cannot write the certificates"),
    # The server process loads the TLS files before the engine loads the model (here: a missing one);
    # the spawned front ends load them again only after that.
    "TLS key missing with front ends": (["serve", "--front-ends", "2", "--model", "{unwritable}", "--tls-cert", "{token}",
                                         "--tls-key", "{unwritable}"], "cannot load the TLS certificate"),
    "zero denoising steps": (["image", "a fox", "--steps", "0"], "'--steps'"),
    "negative denoising steps": (["image", "a fox", "--steps", "-3"], "'--steps'"),
    "device part without --server": (["generate", "hi", "--model", "{device_part}"], "pass --server ws://HOST:PORT"),
    "device part without --server (ui)": (["ui", "--port", "0", "--model", "{device_part}"], "is an exported device part"),
    "prompt and --prompt-file": (["generate", "hi", "--prompt-file", "{token}"], "one of them"),
    "no prompt": (["generate"], "give the prompt as an argument"),
    "prompt file not UTF-8": (["generate", "--prompt-file", "{token}"], "is not UTF-8 text"),
    "prompt file missing": (["generate", "--prompt-file", "{unwritable}"], "cannot read the prompt file"),
    "too many decoys in process": (["generate", "hi", "--decoys", "99"], "--decoys 99: 100 rows exceed the 16 rows"),
    "split leaving the body empty": (["info", "--model", "{valid}", "--split", "1,1"], "leaving the body (cloud) empty"),
    "K range starting at 0": (["generate", "hi", "--model", "{valid}", "--split", "0-1,1"], "K=0 sends raw token embeddings"),
    "K range leaving the body empty": (["generate", "hi", "--model", "{valid}", "--split", "0-1,1", "--allow-shallow"],
                                       "split K=1, M=1: K + M = 2 is every one"),
    "body quantized to int8": (["serve", "--quantize", "int8"], "the body supports fp8"),
    "fp8 body on the CPU": (["serve", "--quantize", "fp8", "--device", "cpu"], "--quantize fp8 needs --device cuda"),
    "empty stop string": (["generate", "hi", "--model", "{valid}", "--stop", ""], "--stop strings must not be empty"),
    "unknown --quantize (info)": (["info", "--quantize", "bad"], "'bad': choose one of int8, int4, gguf-exact"),
    "unknown --quantize (export)": (["export", "--out", "{unwritable}", "--quantize", "int2"], "'int2': choose one of"),
    "gguf-exact in bfloat16 (info)": (["info", "--model", "{valid}", "--split", "1,0", "--allow-shallow", "--dtype", "bfloat16",
                                       "--quantize", "gguf-exact"], "computes in float32"),
}
PRINTS_NOTHING = ("unknown --quantize (info)", "unknown --quantize (export)", "gguf-exact in bfloat16 (info)")
if not torch.cuda.is_available():
    CASES["cuda without a GPU"] = (["serve", "--device", "cuda"], "no CUDA GPU is available")
if torch.cuda.device_count() < 2:  # one line from the command itself, not torchrun's ranks failing
    CASES["tensor parallel on GPUs the host lacks"] = (
        ["serve", "--tensor-parallel", "2", "--device", "cuda"],
        "--tensor-parallel 2 --device cuda needs 2 CUDA GPUs on this host" if torch.cuda.is_available() else "no CUDA GPU is available",
    )


@pytest.fixture(scope="module")
def results(files) -> dict[str, subprocess.CompletedProcess]:
    """Every case in parallel subprocesses, a few at a time: all ~40 at once (each importing torch)
    starved one another on a loaded 2-core machine past any sane hang guard."""
    from concurrent.futures import ThreadPoolExecutor

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LAMBDASPLIT_CACHE": files["cache"]}

    def run(args: list) -> subprocess.CompletedProcess:
        argv = [a if isinstance(a, bytes) else a.format(**files) for a in args]
        proc = subprocess.run([*CLI, *argv], capture_output=True, env=env, timeout=240)
        return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())

    with ThreadPoolExecutor(max_workers=max(4, 2 * (os.cpu_count() or 1))) as pool:
        futures = {name: pool.submit(run, args) for name, (args, _) in CASES.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_invocation_is_one_line_and_exit_2(results, name):
    proc, fragment = results[name], CASES[name][1]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert fragment in errors[0], proc.stderr


@pytest.mark.parametrize("name", PRINTS_NOTHING)
def test_a_bad_option_is_refused_before_anything_is_printed(results, name):
    """`info --quantize bad` printed the model's header lines, then its error: an option is checked first."""
    assert results[name].stdout == "", results[name].stdout


def test_corrupt_gguf_says_it_is_converting_without_verbose(results):
    """The conversion notice is printed without -v (here just before the file proves unreadable)."""
    assert "lambdasplit: converting bad.gguf to safetensors" in results["corrupt gguf"].stderr


def _main(monkeypatch, capsys, *args: str) -> tuple[int, list[str], str]:
    """`lambdasplit ARGS` in this process as the script runs it: exit status, `error:` lines, stderr."""
    from lambdasplit.cli import main

    monkeypatch.setattr(sys, "argv", ["lambdasplit", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    err = capsys.readouterr().err
    return exited.value.code, [line for line in err.splitlines() if line.startswith("error:")], err


class Relaunched(Exception):
    """os.execv was called: torchrun would have started."""


@pytest.fixture
def torchrun(monkeypatch) -> list[list[str]]:
    """The torchrun relaunch recorded instead of run, outside any torchrun group, on a host with 8 GPUs."""
    started: list[list[str]] = []

    def execv(path: str, argv: list[str]) -> None:
        started.append(argv)
        raise Relaunched

    monkeypatch.setattr("lambdasplit.engine.parallel.os.execv", execv)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    return started


TP_REFUSED = {
    "compile": (["--compile"], "--compile and --quantize apply to a body served without --tensor-parallel"),
    "fp8": (["--quantize", "fp8", "--device", "cuda"], "--compile and --quantize apply to a body served without"),
    "pipeline": (["--pipeline", "tiny-sdxl"], "--tensor-parallel serves text bodies only"),
    "K range": (["--split", "1-2,2"], "--tensor-parallel cannot be combined with a K range"),
    "engine process": (["--engine-process"], "--engine-process runs one process's body"),
    "front ends": (["--front-ends", "2"], "--front-ends needs the engine in its own process"),
    "one GPU by index": (["--device", "cuda:1"], "--tensor-parallel runs its ranks on --device cuda (a GPU each) or cpu"),
    "more ranks than GPUs": (["--tensor-parallel", "9", "--device", "cuda"],
                             "--tensor-parallel 9 --device cuda needs 9 CUDA GPUs on this host; it has 8"),
    "no token off loopback": (["--host", "0.0.0.0"], "refusing to serve on 0.0.0.0 without authentication"),
    "port in use": (["--port", "{taken}"], "already in use"),
    "TLS key missing": (["--tls-cert", "{token}", "--tls-key", "{unwritable}"], "cannot load the TLS certificate"),
}


@pytest.mark.parametrize("name", list(TP_REFUSED))
def test_tensor_parallel_refuses_before_starting_torchrun(name, files, torchrun, monkeypatch, capsys):
    args, fragment = TP_REFUSED[name]
    code, errors, err = _main(monkeypatch, capsys, "serve", "--tensor-parallel", "2", *[a.format(**files) for a in args])
    assert torchrun == [], "torchrun was started"
    assert code == 2 and len(errors) == 1 and fragment in errors[0], err


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_tensor_parallel_relaunches_under_torchrun_once_checked(device, torchrun, monkeypatch):
    """The refusals above are not a relaunch that fails: good options reach torchrun, with the command as given."""
    from lambdasplit.cli import main

    args = ["serve", "--tensor-parallel", "2", "--device", device, "--port", "0"]
    monkeypatch.setattr(sys, "argv", ["lambdasplit", *args])
    with pytest.raises(Relaunched):
        main()
    assert torchrun == [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                         "-m", "lambdasplit.cli", *args]]


@pytest.mark.parametrize(("args", "fragment"), [
    (["--quantize", "fp8", "--device", "cuda", "--split", "1-2,2"], "--quantize fp8 cannot be combined with a K range"),
    (["--compile", "--pipeline", "tiny-sdxl"], "--compile and --quantize apply to a text body; drop them with --pipeline"),
    (["--quantize", "fp8", "--pipeline", "tiny-sdxl", "--device", "cuda"], "--compile and --quantize apply to a text body"),
])
def test_serve_refuses_body_options_it_cannot_apply_before_loading(args, fragment, monkeypatch, capsys):
    def load(*_, **__):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr("lambdasplit.engine.loading.load_scheduler", load)
    monkeypatch.setattr("lambdasplit.diffusion.cloud.load_diffusion_scheduler", load)
    code, errors, err = _main(monkeypatch, capsys, "serve", "--port", "0", *args)
    assert code == 2 and len(errors) == 1 and fragment in errors[0], err


def test_serve_compile_with_a_failing_compiler_is_one_error_at_start_up(llama, monkeypatch, capsys):
    """The warm-up compiles at load: a compiler that fails stops `serve` before it listens, with the
    cause, rather than failing every session's first step."""
    def broken(gm, example_inputs):
        raise RuntimeError("C++ compile error: cc1plus: fatal error: cannot execute\ncompilation terminated.")

    def listen(*_, **__):
        raise AssertionError("the server started")

    torch._dynamo.reset()  # graphs compiled earlier in this process would not ask the backend
    monkeypatch.setattr("lambdasplit.engine.optimize.BACKEND", broken)
    monkeypatch.setattr("lambdasplit.cloud.server.BodyServer.serve_forever", listen)
    try:
        code, errors, err = _main(monkeypatch, capsys, "serve", "--model", str(llama), "--split", "2,2", "--compile", "--port", "0")
    finally:
        torch._dynamo.reset()
    assert code == 2 and "Traceback" not in err, err
    assert errors == ["error: --compile: compiling the body at start-up failed (RuntimeError: C++ compile error: cc1plus: "
                      "fatal error: cannot execute); fix the compiler (on the CPU inductor needs a working C++ compiler) "
                      "or serve without --compile"], err


def _serve_command():
    import typer

    from lambdasplit.cli import app

    return typer.main.get_command(app).commands["serve"]


def test_serve_dtype_help_describes_the_body():
    """serve shared generate's --dtype help, which spoke of `export from` a GGUF and of gguf-exact (device options serve lacks)."""
    dtype = next(p for p in _serve_command().params if p.name == "dtype")
    assert "gguf-exact" not in dtype.help and "export from" not in dtype.help
    assert "what the body" in dtype.help


def test_readme_serve_synopsis_lists_every_serve_option():
    lines = Path(__file__).resolve().parents[1].joinpath("README.md").read_text().splitlines()
    synopsis, inside = [], False
    for line in lines:
        if line.startswith("lambdasplit "):
            inside = line.startswith("lambdasplit serve ")
        elif not line.startswith(" "):
            inside = False
        if inside:
            synopsis.append(line.split("#")[0])
    written = set(re.findall(r"--[a-z][\w-]*", " ".join(synopsis)))
    missing = [p.opts[0] for p in _serve_command().params
               if p.name != "help" and not written & {*p.opts, *p.secondary_opts}]
    assert missing == [], f"README.md's serve synopsis lacks {missing}"


def test_server_process_times_out_on_a_silent_child():
    from lambdasplit.cloud.process import ServerProcess
    from lambdasplit.errors import LambdaSplitError

    silent = [sys.executable, "-c", "import time; time.sleep(120)"]
    start = time.monotonic()
    with pytest.raises(LambdaSplitError, match=r"did not start within 1.5 s \(it printed nothing\)") as caught:
        ServerProcess(timeout=1.5, command=silent)
    assert 1.5 <= time.monotonic() - start < 20
    assert "Traceback" not in str(caught.value)


def test_server_process_reports_the_childs_output_when_it_exits():
    from lambdasplit.cloud.process import ServerProcess
    from lambdasplit.errors import LambdaSplitError

    failing = [sys.executable, "-c", "import sys; print('error: cannot listen on 127.0.0.1:1: nope'); sys.exit(2)"]
    with pytest.raises(LambdaSplitError) as caught:
        ServerProcess(timeout=60, command=failing)
    message = str(caught.value)
    assert "exited with status 2 before it was ready" in message
    assert "error: cannot listen on 127.0.0.1:1: nope" in message


def test_gguf_tensor_bar_is_ours_and_restored(capsys):
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from lambdasplit.split.sources import _tensor_bar

    original = gguf_utils.tqdm
    with _tensor_bar("model.gguf"):
        assert list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...")) == [0, 1, 2]
    assert gguf_utils.tqdm is original
    err = capsys.readouterr().err
    assert "converting model.gguf:" in err and "/3 [" in err and "tensor/s" in err and "de-quantizing" not in err


def test_warning_when_the_tokenizer_has_no_chat_template(capsys):
    """On a real SplitRuntime (the check once read an attribute the device no longer had, so it never warned)."""
    import copy

    from lambdasplit.commands.options import warn_without_chat_template
    from lambdasplit.device.runtime import SplitRuntime
    from lambdasplit.device.tokens import PromptTokenizer

    runtime = SplitRuntime.load(None, (2, 2))
    warn_without_chat_template(runtime)
    assert capsys.readouterr().err == ""
    untemplated = copy.deepcopy(runtime.tokenizer)
    untemplated.chat_template = None
    warn_without_chat_template(SplitRuntime(runtime.model, PromptTokenizer(runtime.opened, untemplated)))
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{runtime.opened.checkpoint.path.name} has no chat template; prompts are sent raw" in err


def test_audit_progress_counts_every_unit(tmp_path, smollm2_dir):
    """The bar's total is the work: it ends exactly when the audit does, never before."""
    from lambdasplit.privacy.audit import AuditConfig, audit_units, run_audit
    from tests.conftest import build_tiny

    model = build_tiny("llama", tmp_path / "llama", smollm2_dir)
    config = AuditConfig(source=str(model), splits=[(1, 1), (2, 1)], defenses=["none", "int8"],
                         attacks=["tail-replay", "learned-inversion"], prompts=2, max_new_tokens=2,
                         inversion_steps=2)
    calls = []
    run_audit(config, progress=lambda label, done, total: calls.append((label, done, total)))
    # per split: 2 references + 2 defenses x (1 quality + 2 prompts); plus one inverter per K (1 and 2)
    assert audit_units(config) == 2 * (2 + 2 * 3) + 2
    assert calls[-1][1] == calls[-1][2] == audit_units(config)
    assert all(done <= total for _, done, total in calls)
    assert [done for _, done, _ in calls] == sorted(done for _, done, _ in calls)
    assert sum(1 for label, _, _ in calls if label.startswith("training the inverter")) == 4  # 2 K x (start, end)


def test_a_tls_certificate_or_key_that_cannot_be_loaded_is_named(tmp_path):
    """OpenSSL's error for a missing file names neither file."""
    from lambdasplit.errors import LambdaSplitError
    from lambdasplit.security import server_ssl_context

    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    with pytest.raises(LambdaSplitError) as refused:
        server_ssl_context(cert, key)
    assert str(refused.value) == f"cannot load the TLS certificate {cert} with the key {key}: [Errno 2] No such file or directory"


def _encrypted_key(tmp_path, passphrase: bytes):
    from cryptography.hazmat.primitives import serialization

    from lambdasplit.security import make_certificates

    paths = make_certificates(tmp_path, ["localhost"])
    key = serialization.load_pem_private_key(paths["key"].read_bytes(), None)
    encrypted = tmp_path / "encrypted-key.pem"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(passphrase)))
    return paths["cert"], encrypted


def test_an_encrypted_tls_key_is_refused_without_its_passphrase_never_prompted_for(tmp_path):
    """OpenSSL asked for the passphrase on the terminal, once in the server and again in every front
    end; a service without a terminal hung there."""
    from lambdasplit.errors import LambdaSplitError
    from lambdasplit.security import server_ssl_context

    cert, key = _encrypted_key(tmp_path, b"correct horse")
    with pytest.raises(LambdaSplitError, match=r"is encrypted: pass a file holding its passphrase with --tls-key-password-file"):
        server_ssl_context(cert, key)
    with pytest.raises(LambdaSplitError, match=r"is the passphrase in --tls-key-password-file the key's\?"):
        server_ssl_context(cert, key, "wrong")
    assert server_ssl_context(cert, key, "correct horse") is not None


def test_serve_reads_the_tls_key_passphrase_from_a_file_for_itself_and_its_front_ends(tmp_path, monkeypatch, capsys):
    import pickle

    from lambdasplit.cloud.frontends import FrontEndSpec
    from lambdasplit.security import read_key_password

    cert, key = _encrypted_key(tmp_path, b"correct horse")
    (tmp_path / "pass").write_text("correct horse\n")
    password = read_key_password(tmp_path / "pass")
    assert password == "correct horse"
    spec = pickle.loads(pickle.dumps(FrontEndSpec("127.0.0.1", 0, None, cert, key, 60.0, False, password)))  # as spawned
    assert spec.config().tls is not None
    (tmp_path / "empty").write_text("")
    port = ["--port", str(_free_port())]
    for path, message in ((tmp_path / "empty", "is empty"), (tmp_path / "missing", "cannot read the TLS key password file")):
        code, errors, _ = _main(monkeypatch, capsys, "serve", *port, "--tls-cert", str(cert), "--tls-key", str(key),
                                "--tls-key-password-file", str(path))
        assert code == 2 and len(errors) == 1 and message in errors[0]
    code, errors, _ = _main(monkeypatch, capsys, "serve", *port, "--tls-key-password-file", str(tmp_path / "pass"))
    assert code == 2 and errors == ["error: --tls-key-password-file goes with --tls-cert and --tls-key"]
    code, errors, _ = _main(monkeypatch, capsys, "serve", *port, "--tls-cert", str(cert), "--tls-key", str(key))
    assert code == 2 and len(errors) == 1 and "--tls-key-password-file F" in errors[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

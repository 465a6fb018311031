"""Quantized device parts (split/quantize.py): the kernels compute what the stored values say, an
export holds them quantized and loads back quantized, and a server generates for such a device."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lambdasplit.cloud.process import ServerProcess
from lambdasplit.device.remote import RemoteBody
from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.device.sampling import SamplingParams
from lambdasplit.engine.local import load_local_body
from lambdasplit.errors import LambdaSplitError, SourceError
from lambdasplit.split.export import export_parts
from lambdasplit.split.inspect import part_sizes
from lambdasplit.split.load import open_source
from lambdasplit.split.manifest import PartManifest
from lambdasplit.split.quantize import (
    EXACT,
    QuantizedEmbedding,
    QuantizedLinear,
    dequantize,
    dequantize_blocks,
    quantize_weight,
)

IDS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 2030, 30]])


def _loaded(module: nn.Module, scheme: str, weight: torch.Tensor, **extra: torch.Tensor) -> nn.Module:
    stored = {"weight" + suffix: value for suffix, value in quantize_weight(weight, scheme).items()}
    module.load_state_dict({**stored, **extra}, strict=True, assign=True)
    return module


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_linear_computes_its_stored_values(scheme):
    """The CPU kernel's output equals bf16 inputs times the dequantized weight (fp32 sums, bf16 out)."""
    torch.manual_seed(0)
    linear = nn.Linear(96, 48, bias=True)
    weight = linear.weight.detach()
    layer = _loaded(QuantizedLinear(linear, scheme), scheme, weight, bias=linear.bias.detach())
    stored = quantize_weight(weight, scheme)
    values = dequantize(stored[""], stored["_scale"], stored.get("_zero"))
    step = stored["_scale"].float().max().item()
    assert (values - weight).abs().max().item() <= step * (0.5 if scheme == "int8" else 1.0)  # int4 may clip
    layer.prepare()
    x = torch.randn(2, 3, 96)
    want = x.to(torch.bfloat16).float() @ values.T + linear.bias.detach()
    got = layer(x)
    assert got.shape == (2, 3, 48) and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_embedding_dequantizes_rows_and_keeps_gemmas_scale(scheme):
    torch.manual_seed(0)
    table = nn.Embedding(64, 32)
    table.scalar_embed_scale = 32**0.5  # what Gemma3TextScaledWordEmbedding carries
    layer = _loaded(QuantizedEmbedding(table, scheme, torch.float32), scheme, table.weight.detach())
    stored = quantize_weight(table.weight.detach(), scheme)
    values = dequantize(stored[""], stored["_scale"], stored.get("_zero"))
    ids = torch.tensor([[3, 0, 63, 3]])
    assert torch.equal(layer(ids), values[ids] * torch.tensor(32**0.5))


def test_int4_refuses_shapes_the_kernel_cannot_take():
    with pytest.raises(SourceError, match="divisible by 16"):
        quantize_weight(torch.randn(40, 64), "int4")
    with pytest.raises(SourceError, match="divisible by 32"):
        quantize_weight(torch.randn(64, 48), "int4")


@pytest.fixture(scope="module")
def int4_parts(llama, tmp_path_factory):
    return export_parts(llama, (2, 2), tmp_path_factory.mktemp("int4"), quantize="int4")


def test_a_quantized_export_stores_and_loads_quantized(int4_parts, llama):
    device_dir = int4_parts["device"]
    manifest = PartManifest.read(device_dir)
    assert manifest.quantize == "int4" and manifest.dtype == "float32"
    assert PartManifest.read(int4_parts["cloud"]).quantize is None
    with safe_open(str(device_dir / "model.safetensors"), framework="pt") as handle:
        dtypes = {key: handle.get_slice(key).get_dtype() for key in handle.keys()}
    assert dtypes["model.layers.0.mlp.up_proj.weight"] == "U8"  # two 4-bit values per byte
    assert dtypes["model.embed_tokens.weight"] == "I8"  # int4 parts keep the tied embedding / LM head int8
    assert dtypes["model.layers.0.input_layernorm.weight"] == "F32"
    runtime = SplitRuntime.load(device_dir)
    assert runtime.manifest.quantize == "int4"
    assert isinstance(runtime.head.module.layers[0].mlp.up_proj, QuantizedLinear)
    assert isinstance(runtime.head.module.embed_tokens, QuantizedEmbedding)
    assert isinstance(runtime.tail.module.lm_head, QuantizedLinear)
    # The same weights quantized at load give the same tokens as the export.
    on_load = SplitRuntime.load(llama, (2, 2), quantize="int4")
    body = load_local_body(llama, (2, 2))
    options = SamplingParams(max_new_tokens=8)
    exported = runtime.generate_ids(body, IDS, None, options).token_ids
    assert exported == on_load.generate_ids(body, IDS, None, options).token_ids


@pytest.mark.parametrize("parts", ["int4_parts", "exact_parts"])
def test_a_server_generates_for_a_quantized_device(parts, request):
    """The CI check of issue 25: the body server (float32, unchanged) serves an int4 / gguf-exact device part."""
    parts = request.getfixturevalue(parts)
    runtime = SplitRuntime.load(parts["device"])
    with ServerProcess("--part", str(parts["cloud"])) as proc:
        body = RemoteBody(proc.url, runtime.manifest, connect_timeout=30.0)
        result = runtime.generate_ids(body, IDS, None, SamplingParams(max_new_tokens=10))
        body.close()
    local = runtime.generate_ids(load_local_body(str(parts["cloud"])), IDS, None, SamplingParams(max_new_tokens=10))
    assert len(result.token_ids[0]) == 10 and result.token_ids == local.token_ids


def test_logits_stay_close_to_float32(llama):
    """int8 device parts move the tiny model's logits by little next to their spread (measured: 12% of
    the standard deviation at most), and no position's argmax changes."""
    reference = SplitRuntime.load(llama, (2, 2))
    quantized = SplitRuntime.load(llama, (2, 2), quantize="int8")
    body = load_local_body(llama, (2, 2))
    logits = []
    for runtime in (reference, quantized):
        model = runtime.model
        logits.append(model(IDS, past_key_values=model.new_cache(body)).logits)
    assert (logits[0] - logits[1]).abs().max() < 0.2 * logits[0].std()
    assert torch.equal(logits[0].argmax(-1), logits[1].argmax(-1))


def test_a_quantized_export_refuses_another_scheme_and_a_gpu(int4_parts, llama):
    with pytest.raises(SourceError, match="holds int4 weights; --quantize int8 needs an export from the full model"):
        SplitRuntime.load(int4_parts["device"], quantize="int8")
    with pytest.raises(SourceError, match="runs on the CPU"):
        SplitRuntime.load(llama, (2, 2), device="cuda", quantize="int8")
    with pytest.raises(LambdaSplitError, match="unknown --quantize 'int2'"):
        SplitRuntime.load(llama, (2, 2), quantize="int2")


def test_info_shows_bytes_and_precision_of_each_part(int4_parts):
    out = subprocess.run([sys.executable, "-m", "lambdasplit.cli", "info", "--model", str(int4_parts["device"])],
                         capture_output=True, text=True, check=True, env=None).stdout
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.startswith("│")}
    assert "int4" in rows["head"] and "int4" in rows["tail"] and "MiB" in rows["head"]
    assert " 0.0 MiB" in rows["body"]


@pytest.fixture(scope="module")
def float_parts(llama, tmp_path_factory):
    return export_parts(llama, (2, 2), tmp_path_factory.mktemp("float"))


def test_info_shows_an_export_as_quantize_and_dtype_would_load_it(float_parts, int4_parts):
    """`generate --quantize int4` quantizes a float32 export at load, so `info --quantize int4` shows the
    bytes an int4 export stores (it showed the float32 ones); --dtype likewise; a quantized export's
    scheme is fixed, so another --quantize is one error line before anything is printed."""
    float_device = open_source(float_parts["device"])
    stored = part_sizes(open_source(int4_parts["device"]), torch.float32)
    as_int4 = part_sizes(float_device, torch.float32, "int4")
    as_float, as_bf16 = part_sizes(float_device, torch.float32), part_sizes(float_device, torch.bfloat16)
    for role in ("head", "tail"):
        assert as_int4[role] == stored[role] and stored[role].precision == "int4"
        assert as_bf16[role].bytes * 2 == as_float[role].bytes and as_bf16[role].precision == "bfloat16"
    info = [sys.executable, "-m", "lambdasplit", "info", "--model"]
    out = subprocess.run([*info, str(float_parts["device"]), "--quantize", "int4"], capture_output=True, text=True, check=True).stdout
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.startswith("│")}
    assert "int4" in rows["head"] and f"{stored['head'].bytes / 2**20:.1f} MiB" in rows["head"]
    refused = subprocess.run([*info, str(int4_parts["device"]), "--quantize", "int8"], capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip() == f"error: {int4_parts['device']} holds int4 weights; --quantize int8 needs an export from the full model"


def test_manifest_quantize_field_is_checked():
    base = json.loads(PartManifest(
        role="device", model_type="llama", fingerprint="0" * 64, layers=4, hidden_size=8, head=(0, 1), body=(1, 3),
        tail=(3, 4), dtype="float32").to_json())
    assert PartManifest.from_dict(base).quantize is None
    assert PartManifest.from_dict({**base, "quantize": "int8"}).quantize == "int8"
    with pytest.raises(LambdaSplitError, match="quantize = 'fp8' is not one of int8, int4, gguf-exact"):
        PartManifest.from_dict({**base, "quantize": "fp8"})


@pytest.mark.slow
def test_a_gguf_exports_in_bfloat16_by_default(tmp_path):
    """The embedded GGUF (4-bit weights) is not blown up to float32 unless --dtype asks for it."""
    parts = export_parts(None, (1, 1), tmp_path / "a", quantize="int8")
    assert PartManifest.read(parts["device"]).dtype == "bfloat16" == PartManifest.read(parts["cloud"]).dtype
    with safe_open(str(parts["cloud"] / "model.safetensors"), framework="pt") as handle:
        assert handle.get_slice("model.layers.1.mlp.up_proj.weight").get_dtype() == "BF16"
    runtime = SplitRuntime.load(parts["device"])
    ids, _ = runtime.encode("The capital of France is", raw=True)
    assert len(runtime.generate_ids(load_local_body(str(parts["cloud"])), ids, None, SamplingParams(max_new_tokens=4)).token_ids[0]) == 4


def test_cli_generate_quantizes_the_device(llama):
    """`generate --quantize int8` gives the tokens of the same int8 device loaded in Python."""
    cmd = [sys.executable, "-m", "lambdasplit.cli", "generate", "--model", str(llama), "--split", "2,2", "--quantize", "int8",
           "-n", "6", "--json", "--raw", "Hello there"]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout)
    runtime = SplitRuntime.load(llama, (2, 2), quantize="int8")
    ids, _ = runtime.encode("Hello there", raw=True)
    expected = runtime.generate_ids(load_local_body(llama, (2, 2)), ids, None, SamplingParams(max_new_tokens=6)).token_ids
    assert out["token_ids"] == expected[0]


@pytest.mark.parametrize("command", [["gateway", "--server", "ws://127.0.0.1:9"], ["ui", "--no-image"]])
def test_gateway_and_ui_load_a_quantized_device(llama, monkeypatch, command):
    """gateway and ui pass --quantize to the device they serve (uvicorn is not started here)."""
    from typer.testing import CliRunner

    from lambdasplit.cli import app

    loaded: list[SplitRuntime] = []
    original = SplitRuntime.load
    monkeypatch.setattr(SplitRuntime, "load", staticmethod(lambda *a, **k: loaded.append(original(*a, **k)) or loaded[-1]))
    served: list[object] = []
    monkeypatch.setattr("uvicorn.run", lambda app_, **_: served.append(app_))
    result = CliRunner().invoke(app, [*command, "--model", str(llama), "--split", "2,2", "--quantize", "int4", "--port", "0"])
    assert result.exit_code == 0, result.output
    assert len(served) == 1 and [d.manifest.quantize for d in loaded] == ["int4"]
    assert isinstance(loaded[0].head.module.layers[0].mlp.up_proj, QuantizedLinear)


def test_from_pretrained_quantizes_the_device(llama):
    from lambdasplit.device.model import SplitModelForCausalLM

    model = SplitModelForCausalLM.from_pretrained(llama, (2, 2), quantize="int4")
    assert isinstance(model.tail.module.lm_head, QuantizedLinear)
    out = model.generate(IDS, max_new_tokens=5, do_sample=False)[0, IDS.shape[1]:].tolist()
    runtime = SplitRuntime.load(llama, (2, 2), quantize="int4")
    assert [out] == runtime.generate_ids(load_local_body(llama, (2, 2)), IDS, None, SamplingParams(max_new_tokens=5)).token_ids


# gguf-exact: a GGUF's own blocks of 32, recovered from the dequantized float32 weights.

_GGUF_TYPES = {"Q4_0": GGMLQuantizationType.Q4_0, "Q4_1": GGMLQuantizationType.Q4_1, "Q8_0": GGMLQuantizationType.Q8_0}


def _gguf_rounded(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """`weight` as a GGUF of type `kind` stores it and transformers dequantizes it (gguf's own code)."""
    blocks = quants.quantize(weight.numpy().astype(np.float32), _GGUF_TYPES[kind])
    return torch.from_numpy(quants.dequantize(blocks, _GGUF_TYPES[kind]).astype(np.float32))


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_exact_gives_back_a_gguf_block_grid_bit_for_bit(kind):
    torch.manual_seed(0)
    weight = _gguf_rounded(torch.randn(32, 96) * 0.05, kind)
    stored = quantize_weight(weight, EXACT)
    assert stored["_block_scale"].dtype == torch.float32 and stored["_block_scale"].shape == (32, 3)
    assert ("_block_min" in stored) == (kind != "Q8_0")  # 4-bit blocks: w = d*q + m; 8-bit: w = d*q
    assert stored[""].dtype == (torch.int8 if kind == "Q8_0" else torch.uint8)
    assert torch.equal(dequantize_blocks(stored[""], stored["_block_scale"], stored.get("_block_min")), weight)


def test_gguf_exact_refuses_weights_on_no_gguf_grid():
    torch.manual_seed(0)
    with pytest.raises(SourceError, match=r"proj.weight \(32, 64\) is not on one GGUF block grid of 32 .* 64 of 64 blocks are on none"):
        quantize_weight(torch.randn(32, 64), EXACT, "proj.weight")
    off = _gguf_rounded(torch.randn(32, 64), "Q4_1")
    off[5, 7] += 1e-3  # one weight off its block's grid
    with pytest.raises(SourceError, match="1 of 64 blocks are on none"):
        quantize_weight(off, EXACT, "proj.weight")


@pytest.fixture(scope="module")
def gguf_llama(llama, tmp_path_factory) -> Path:
    """The tiny Llama as a GGUF would hold it: projections in Q4_1 (v_proj in Q4_0), the tied embedding in Q8_0."""
    directory = tmp_path_factory.mktemp("gguf-llama") / "model"
    shutil.copytree(llama, directory)
    tensors = load_file(str(directory / "model.safetensors"))
    for key, value in tensors.items():
        if value.dim() == 2:
            kind = "Q8_0" if "embed_tokens" in key else "Q4_0" if "v_proj" in key else "Q4_1"
            tensors[key] = _gguf_rounded(value, kind)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


@pytest.fixture(scope="module")
def exact_parts(gguf_llama, tmp_path_factory):
    return export_parts(gguf_llama, (2, 2), tmp_path_factory.mktemp("exact"), quantize=EXACT)


def test_gguf_exact_gives_the_float32_splits_tokens(gguf_llama, exact_parts):
    reference = SplitRuntime.load(gguf_llama, (2, 2))
    on_load = SplitRuntime.load(gguf_llama, (2, 2), quantize=EXACT)
    exported = SplitRuntime.load(exact_parts["device"])
    assert isinstance(on_load.head.module.layers[0].mlp.up_proj, QuantizedLinear)
    assert on_load.head.module.layers[0].self_attn.v_proj.kind == "q4" and on_load.tail.module.lm_head.kind == "q8"
    assert on_load.tail.module.lm_head.weight is on_load.head.module.embed_tokens.weight  # tied: stored once
    ids = torch.tensor([[5, 9, 49151, 300]])
    assert torch.equal(on_load.head.module.embed_tokens(ids), reference.head.module.embed_tokens(ids))
    body = load_local_body(gguf_llama, (2, 2))
    options = SamplingParams(max_new_tokens=24)
    expected = reference.generate_ids(body, IDS, None, options).token_ids
    logits = []
    for runtime in (reference, on_load, exported):
        assert runtime is reference or runtime.generate_ids(body, IDS, None, options).token_ids == expected
        model = runtime.model
        logits.append(model(IDS, past_key_values=model.new_cache(body)).logits)
    assert (logits[1] - logits[0]).abs().max() < 1e-4 * logits[0].abs().max()  # float32 sums in another order


def test_info_counts_a_gguf_exact_export(exact_parts, gguf_llama):
    exported = part_sizes(open_source(exact_parts["device"]), torch.float32)
    source = part_sizes(open_source(gguf_llama, (2, 2)), torch.float32)
    estimate = part_sizes(open_source(gguf_llama, (2, 2)), torch.float32, EXACT)
    for role in ("head", "tail"):
        assert exported[role].precision == EXACT and exported[role].parameters == source[role].parameters
        assert exported[role].bytes == estimate[role].bytes < source[role].bytes / 3


def test_a_gguf_exact_export_is_marked_and_refused_by_int4_int8_loaders(exact_parts, monkeypatch):
    device_dir = exact_parts["device"]
    manifest = PartManifest.read(device_dir)
    assert manifest.quantize == EXACT and manifest.dtype == "float32"
    assert PartManifest.read(exact_parts["cloud"]).dtype == "float32"
    with safe_open(str(device_dir / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata()["lambdasplit_quantize"] == EXACT
        dtypes = {key: handle.get_slice(key).get_dtype() for key in handle.keys()}
    assert dtypes["model.layers.0.mlp.up_proj.weight"] == "U8" and dtypes["model.layers.0.mlp.up_proj.weight_block_min"] == "F32"
    assert dtypes["model.embed_tokens.weight"] == "I8" and dtypes["model.embed_tokens.weight_block_scale"] == "F32"
    assert not any(key.endswith(("_scale", "_zero")) and "_block_" not in key for key in dtypes)
    with pytest.raises(SourceError, match="holds gguf-exact weights; --quantize int4 needs an export from the full model"):
        SplitRuntime.load(device_dir, quantize="int4")
    # An int4 module cannot take these tensors (other names), and a loader that knows only int8 and int4 refuses the manifest.
    state = {k.removeprefix("model.layers.0.mlp.up_proj."): v for k, v in load_file(str(device_dir / "model.safetensors")).items()
             if k.startswith("model.layers.0.mlp.up_proj.")}
    with pytest.raises(RuntimeError, match="weight_block_scale"):
        QuantizedLinear(nn.Linear(64, 128, bias=False), "int4").load_state_dict(state, strict=True, assign=True)
    monkeypatch.setattr("lambdasplit.split.manifest.SCHEMES", ("int8", "int4"))
    with pytest.raises(LambdaSplitError, match="quantize = 'gguf-exact' is not one of int8, int4"):
        PartManifest.read(device_dir)


def test_gguf_exact_refuses_an_off_grid_source_and_other_dtypes(llama, gguf_llama, tmp_path):
    with pytest.raises(SourceError, match=r"is not on one GGUF block grid of 32 \(Q4_0, Q4_1, Q8_0\)"):
        SplitRuntime.load(llama, (2, 2), quantize=EXACT)
    with pytest.raises(SourceError, match="gguf-exact computes in float32 .* dtype is bfloat16: drop --dtype"):
        SplitRuntime.load(gguf_llama, (2, 2), dtype="bfloat16", quantize=EXACT)
    with pytest.raises(SourceError, match="is not on one GGUF block grid"):
        export_parts(llama, (2, 2), tmp_path / "out", quantize=EXACT)


@pytest.mark.slow
def test_gguf_exact_gives_the_float32_tokens_of_the_embedded_model():
    """The embedded SmolLM2 GGUF (Q4_1 projections, Q8_0 embeddings): gguf-exact device parts give the
    float32 split's greedy tokens on held-out prompts (all 40 at 64 tokens: docs/benchmarks.md)."""
    from benchmarks.agreement import PROMPTS

    prompts = json.loads(PROMPTS.read_text())[:3]
    body = load_local_body(None, (2, 2))
    options = SamplingParams(max_new_tokens=32)
    reference = SplitRuntime.load(None, (2, 2)).generate(body, prompts, options).token_ids
    assert SplitRuntime.load(None, (2, 2), quantize=EXACT).generate(body, prompts, options).token_ids == reference


def test_quant_parts_loads_gguf_exact_and_refuses_unknown_variants(monkeypatch, capsys):
    """benchmarks.quant_parts names the shipped device parts as the other benchmarks do (gguf-exact
    included), and refuses, before anything loads, a name it would have skipped (measuring float32)."""
    from benchmarks import quant_parts

    loads: list[dict] = []
    monkeypatch.setattr(quant_parts.SplitRuntime, "load", staticmethod(lambda *a, **k: loads.append(k)))
    for variant in ("gguf-exact", "int4", "bfloat16"):
        quant_parts.load(variant)
    assert loads == [{"quantize": EXACT}, {"quantize": "int4"}, {"dtype": "bfloat16"}]
    assert all(quant_parts.known(v) for v in quant_parts.DEFAULT)
    monkeypatch.setattr(quant_parts, "load_local_body", lambda *a: pytest.fail("loaded before checking the variants"))
    for bad in (["real-gguf-exact"], ["gguf_exact"], ["layers:q3"], ["emb:c8+head:c8"], ["emb:k4f32"], ["int8", "float16"]):
        with pytest.raises(SystemExit) as exit_:
            quant_parts.main(bad)
        assert exit_.value.code == 2 and f"unknown variant(s) {bad[-1]!r}: use bfloat16, int8, int4, gguf-exact" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["device", "--precisions", "float32,int3"], ["device", "--models", "llama2-70b"],
                                  ["agreement", "--schemes", "int8,fp8"], ["agreement", "--models", "gemma3-1b"]])
def test_device_and_agreement_benchmarks_refuse_unknown_names(args, monkeypatch):
    """An unknown precision ran as float32 (an unknown model as SmolLM2) under its own name in the results."""
    from typer.testing import CliRunner

    from benchmarks.__main__ import app

    def refuse(*_, **__):
        raise AssertionError("ran before checking the names")

    monkeypatch.setattr("benchmarks.device.run_device", refuse)
    monkeypatch.setattr("benchmarks.agreement.run_agreement", refuse)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and f"unknown ['{args[-1].split(',')[-1]}']" in result.output, result.output

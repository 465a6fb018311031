"""Exported parts hold only their own tensors, load only those, and still reproduce the model."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from lambdasplit.device.runtime import SplitRuntime
from lambdasplit.device.sampling import SamplingParams
from lambdasplit.engine.local import load_local_body
from lambdasplit.errors import SourceError, SplitError
from lambdasplit.split.export import export_parts
from lambdasplit.split.manifest import PartManifest, hash_files
from tests.conftest import build_tiny, oracle


def _keys(directory):
    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        return set(handle.keys())


@pytest.fixture(scope="module")
def exported(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    return export_parts(tiny_models["qwen2"], (2, 1), out)


def test_device_and_cloud_hold_disjoint_tensors(exported):
    device, cloud = _keys(exported["device"]), _keys(exported["cloud"])
    layers = lambda keys: {int(k.split(".")[2]) for k in keys if k.startswith("model.layers.")}  # noqa: E731
    assert layers(device) == {0, 1, 5}
    assert layers(cloud) == {2, 3, 4}
    assert "model.embed_tokens.weight" in device and "lm_head.weight" in device and "model.norm.weight" in device
    assert not any("embed" in k or "lm_head" in k or "model.norm" in k for k in cloud)
    assert not device & cloud
    assert not (exported["cloud"] / "tokenizer.json").exists()


def test_manifests_describe_the_split(exported):
    device = json.loads((exported["device"] / "manifest.json").read_text())
    cloud = json.loads((exported["cloud"] / "manifest.json").read_text())
    assert device["role"] == "device" and cloud["role"] == "cloud"
    assert device["fingerprint"] == cloud["fingerprint"] and len(device["fingerprint"]) == 64
    assert (device["layers"], device["hidden_size"]) == (6, 64)
    assert device["head"] == [0, 2] and device["body"] == [2, 5] and device["tail"] == [5, 6]
    # Every file a part's loader reads is hashed, not only the weights.
    assert {"model.safetensors", "config.json", "part_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(device["files"])
    assert set(cloud["files"]) == {"model.safetensors", "config.json", "part_config.json"}
    for part, manifest in (("device", device), ("cloud", cloud)):
        for name, digest in manifest["files"].items():
            assert hashlib.sha256((exported[part] / name).read_bytes()).hexdigest() == digest


def test_exported_parts_reproduce_the_unsplit_model(exported, tiny_models):
    device = SplitRuntime.load(exported["device"])
    body = load_local_body(exported["cloud"])
    ids = torch.tensor([[1, 22, 333, 4444, 5555, 66]])
    result = device.generate_ids(body, ids, None, SamplingParams(max_new_tokens=8))
    ref = oracle(tiny_models["qwen2"]).generate(ids, max_new_tokens=8, do_sample=False)
    assert result.token_ids[0] == ref[0, ids.shape[1]:].tolist()
    cloud = PartManifest.read(exported["cloud"])
    assert device.manifest.compatible_with(cloud) is None
    other = SplitRuntime.load(tiny_models["qwen2"], (1, 1)).manifest
    assert "head" in other.compatible_with(cloud)


def test_wrong_part_or_split_is_refused(exported):
    with pytest.raises(SourceError, match="cloud part"):
        SplitRuntime.load(exported["cloud"])
    with pytest.raises(SourceError, match="device part"):
        load_local_body(exported["device"])
    with pytest.raises(SplitError, match="exported with split 2,1"):
        SplitRuntime.load(exported["device"], (1, 1))


@pytest.mark.parametrize("side", ["device", "cloud"])
def test_transformers_refuses_an_exported_part(exported, side):
    """Issue 21 item 11: a part's config.json declared the whole model, so transformers built it with
    the other side's layers random and answered garbage; now it refuses the directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, pipeline

    for load in (AutoConfig.from_pretrained, AutoModelForCausalLM.from_pretrained,
                 lambda path: pipeline("text-generation", model=path)):
        with pytest.raises(ValueError, match=f"lambdasplit_{side}_part"):
            load(str(exported[side]))
    stub = json.loads((exported[side] / "config.json").read_text())
    assert "cannot run alone" in stub["note"] and "part_config.json" in stub["note"]


def test_a_part_exported_with_the_models_config_json_still_loads(exported, tiny_models, tmp_path):
    """Parts exported before part_config.json held the real config in config.json; they load as before."""
    import shutil

    old = {}
    for side in ("device", "cloud"):
        old[side] = shutil.copytree(exported[side], tmp_path / side)
        (old[side] / "part_config.json").replace(old[side] / "config.json")
        manifest = PartManifest.read(old[side])
        manifest.files = hash_files(old[side])
        (old[side] / "manifest.json").write_text(manifest.to_json())
    device = SplitRuntime.load(old["device"])
    ids = torch.tensor([[1, 22, 333, 4444, 5555, 66]])
    result = device.generate_ids(load_local_body(old["cloud"]), ids, None, SamplingParams(max_new_tokens=8))
    ref = oracle(tiny_models["qwen2"]).generate(ids, max_new_tokens=8, do_sample=False)
    assert result.token_ids[0] == ref[0, ids.shape[1]:].tolist()


def test_tampered_part_is_refused(tiny_models, tmp_path):
    parts = export_parts(tiny_models["llama"], (1, 1), tmp_path)
    weights = parts["cloud"] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(SourceError, match="sha256"):
        load_local_body(parts["cloud"])


PEAK_SCRIPT = """
import re, sys, psutil, torch, transformers
import transformers.models.llama.modeling_llama
from lambdasplit.engine.local import LocalBody
from lambdasplit.device.runtime import SplitRuntime
kind, path, tokenizer_dir = sys.argv[1:]
transformers.AutoTokenizer.from_pretrained(tokenizer_dir)  # both sides need one: not part of the comparison
ids = torch.arange(1, 9)[None]
base = psutil.Process().memory_info().rss
if kind == "device":
    device = SplitRuntime.load(path)
    device.tail(device.head(ids))  # touch every weight the device holds
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        model(ids)  # touch every weight (safetensors pages are mapped lazily)
# VmHWM, not ru_maxrss: the latter keeps the parent's peak across fork + exec.
peak_kb = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
print(peak_kb * 1024 - base)
"""


def test_device_part_peaks_well_below_the_whole_model(tmp_path, smollm2_dir):
    """A 24-layer model (about 320 MB): the K=M=1 device part must peak far below the full load."""
    model = build_tiny(
        "llama", tmp_path / "big", smollm2_dir, vocab_size=8192, hidden_size=512, intermediate_size=1536,
        num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=4,
    )
    parts = export_parts(model, (1, 1), tmp_path / "parts")

    def peak(kind, path):
        cmd = [sys.executable, "-c", PEAK_SCRIPT, kind, str(path), str(parts["device"])]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return int(out.stdout.strip().splitlines()[-1])

    device_bytes, full_bytes = peak("device", parts["device"]), peak("full", model)
    assert full_bytes > 280e6, f"the full model should show its ~320 MB, saw {full_bytes / 1e6:.0f} MB"
    assert device_bytes < 0.3 * full_bytes, (device_bytes, full_bytes)


# ---- issue 11: every file of a part is hashed; stray or modified files are refused ------------------

from pathlib import Path  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from lambdasplit.errors import LambdaSplitError, WireError  # noqa: E402
from lambdasplit.split import manifest as manifest_module  # noqa: E402
from lambdasplit.split.manifest import Manifest, prepare_output_dir  # noqa: E402

IDS = torch.tensor([[1, 22, 333, 4444, 5555, 66]])


def _plant_zeroed_layer(directory: Path, name: str = "zz-extra.safetensors") -> Path:
    """A safetensors file holding one of the part's own layers, zeroed: loaded, it changes the output."""
    tensors = load_file(str(directory / "model.safetensors"))
    layer = next(k for k in sorted(tensors) if k.startswith("model.layers.") and k.endswith("mlp.down_proj.weight"))
    stray = directory / name
    save_file({layer: torch.zeros_like(tensors[layer])}, str(stray))
    return stray


def _tokens(device_dir, cloud_dir) -> list[int]:
    device, body = SplitRuntime.load(device_dir), load_local_body(cloud_dir)
    return device.generate_ids(body, IDS, None, SamplingParams(max_new_tokens=6)).token_ids[0]


@pytest.fixture(scope="module")
def reference_tokens(tiny_models):
    return oracle(tiny_models["qwen2"]).generate(IDS, max_new_tokens=6, do_sample=False)[0, IDS.shape[1]:].tolist()


def test_planted_safetensors_in_an_exported_part_is_refused(tiny_models, tmp_path):
    parts = export_parts(tiny_models["qwen2"], (2, 1), tmp_path)
    stray = _plant_zeroed_layer(parts["cloud"])
    with pytest.raises(SourceError, match=r"zz-extra\.safetensors: not listed in .*manifest\.json"):
        load_local_body(parts["cloud"])
    stray.unlink()
    _plant_zeroed_layer(parts["device"], ".hidden.safetensors")
    with pytest.raises(SourceError, match=r"\.hidden\.safetensors: not listed"):
        SplitRuntime.load(parts["device"])


def test_modified_config_or_tokenizer_is_refused(tiny_models, tmp_path):
    parts = export_parts(tiny_models["qwen2"], (2, 1), tmp_path)
    config_path = parts["cloud"] / "part_config.json"
    config = json.loads(config_path.read_text())
    config["rms_norm_eps"] = 0.5
    config_path.write_text(json.dumps(config))
    with pytest.raises(SourceError, match=r"part_config\.json: sha256 does not match the manifest"):
        load_local_body(parts["cloud"])
    tokenizer = parts["device"] / "tokenizer_config.json"
    tokenizer.write_text(tokenizer.read_text() + " ")
    with pytest.raises(SourceError, match=r"tokenizer_config\.json: sha256 does not match"):
        SplitRuntime.load(parts["device"])
    (parts["device"] / "tokenizer.json").unlink()
    tokenizer.write_text(tokenizer.read_text()[:-1])
    with pytest.raises(SourceError, match=r"tokenizer\.json: listed in the manifest, is missing"):
        SplitRuntime.load(parts["device"])


def test_export_into_a_non_empty_directory_needs_force(tiny_models, tmp_path, reference_tokens):
    """The reported defect: a stray file already in --out went into the part, with wrong tokens."""
    out = tmp_path / "out"
    (out / "cloud").mkdir(parents=True)
    donor = export_parts(tiny_models["qwen2"], (2, 1), tmp_path / "donor")
    stray = _plant_zeroed_layer(donor["cloud"])
    stray.rename(out / "cloud" / stray.name)
    with pytest.raises(LambdaSplitError, match=r"is not empty; .*--force"):
        export_parts(tiny_models["qwen2"], (2, 1), out)
    assert (out / "cloud" / stray.name).is_file()  # refused before touching anything
    parts = export_parts(tiny_models["qwen2"], (2, 1), out, force=True)
    assert not (out / "cloud" / stray.name).exists()
    assert _tokens(parts["device"], parts["cloud"]) == reference_tokens


def test_force_is_refused_where_deleting_would_hurt(tiny_models, tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "work").mkdir(parents=True)
    (home / "notes.txt").write_text("keep me")
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(LambdaSplitError, match="home directory"):
        prepare_output_dir(home, force=True)
    monkeypatch.chdir(home / "work")
    (home / "work" / "file").write_text("keep me too")
    with pytest.raises(LambdaSplitError, match="current directory"):
        prepare_output_dir(home / "work", force=True)
    assert (home / "notes.txt").read_text() == "keep me" and (home / "work" / "file").is_file()
    assert "root" in manifest_module._dangerous(Path("/")) and "top-level" in manifest_module._dangerous(Path("/tmp"))
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    with pytest.raises(LambdaSplitError, match="git repository"):
        prepare_output_dir(repo, force=True)
    model_parent = tiny_models["qwen2"].parent  # holds the model being exported
    with pytest.raises(LambdaSplitError, match="holds the source"):
        export_parts(tiny_models["qwen2"], (2, 1), model_parent, force=True)
    assert (tiny_models["qwen2"] / "model.safetensors").is_file()
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for force in (False, True):
        with pytest.raises(LambdaSplitError, match="is a file"):
            export_parts(tiny_models["qwen2"], (2, 1), a_file, force=force)


def test_cli_export_to_a_file_or_non_empty_dir_is_one_line_exit_2(tiny_models, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cli = [sys.executable, "-m", "lambdasplit.cli", "export", "--model", str(tiny_models["qwen2"]), "--split", "2,1"]
    for out, message in ((a_file, "is a file"), (tmp_path / "full", "is not empty")):
        proc = subprocess.run([*cli, "--out", str(out)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --out ") and message in lines[0], proc.stderr
    proc = subprocess.run(
        [*cli[:3], "export", "--pipeline", "tiny-sd", "--out", str(tmp_path / "full")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "is not empty" in proc.stderr and "Traceback" not in proc.stderr


def test_diffusion_export_hashes_every_file_and_needs_force(tmp_path):
    from lambdasplit.diffusion.parts import PipelineManifest, export_pipeline, open_pipeline

    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("x")
    with pytest.raises(LambdaSplitError, match="is not empty"):
        export_pipeline("tiny-sd", "unet-split", 1, out)
    written = export_pipeline("tiny-sd", "unet-split", 1, out, force=True)
    assert not (out / "old").exists()
    device = PipelineManifest.read(written["device"])
    assert {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"} <= set(device.files)
    assert any(name.startswith("text_encoder/") for name in device.files)
    assert any(name.startswith("vae/") for name in device.files)
    assert open_pipeline(written["device"], "unet-split", 1).exported == device  # verifies
    stray = written["cloud"] / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    stray.write_bytes((written["cloud"] / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(SourceError, match=r"unet/diffusion_pytorch_model\.fp16\.safetensors: not listed"):
        open_pipeline(written["cloud"], "unet-split", 1)
    scheduler = written["device"] / "scheduler" / "scheduler_config.json"
    scheduler.write_text(scheduler.read_text().replace("{", '{"steps_offset": 7, ', 1))
    with pytest.raises(SourceError, match=r"scheduler_config\.json: sha256 does not match"):
        open_pipeline(written["device"], "unet-split", 1)


def test_an_old_format_export_is_refused_with_a_hint(exported, tmp_path):
    data = json.loads((exported["cloud"] / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**data, "format_version": 1, "files": {}}))
    with pytest.raises(SourceError, match="format_version is 1; .*export the parts again"):
        PartManifest.read(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps(data).replace('"layers": 6', '"layers": NaN'))
    with pytest.raises(SourceError, match="NaN is not a number"):
        PartManifest.read(tmp_path)


# ---- issue 11: one manifest contract; hostile manifests give a WireError ------------------------------

GOOD_PART = dict(
    role="device", model_type="qwen2", fingerprint="ab" * 32, layers=6, hidden_size=64, head=[0, 2], body=[2, 5],
    tail=[5, 6], dtype="float32", files={"config.json": "cd" * 32}, format_version=2,
)
GOOD_PIPELINE = dict(role="cloud", family="sdxl", mode="unet-split", k=1, fingerprint="ef" * 32, dtype="float32",
                     files={"unet/config.json": "01" * 32}, format_version=2)


def _part(**changes):
    return {**GOOD_PART, **changes}


def _without(data, key):
    return {k: v for k, v in data.items() if k != key}


HOSTILE_PARTS = [
    (_part(layers=float("inf")), "layers must be an integer, got inf"),  # what json.loads makes of 1e400
    (_part(hidden_size=float("nan")), "hidden_size must be an integer, got nan"),
    (_part(hidden_size=10**400), "hidden_size = a 1329-bit integer is outside"),
    (_part(layers=-1), "layers = -1 is outside"),
    (_part(layers=True), "layers must be an integer, got True"),
    (_part(layers="6"), "layers must be an integer, got '6'"),
    (_part(hidden_size=64.0), "hidden_size must be an integer, got 64.0"),
    (_part(head=[0]), "head must be a [start, stop] pair"),
    (_part(head=[0, float("inf")]), "head must be a [start, stop] pair"),
    (_part(head={"a": 1}), "head must be a [start, stop] pair of integers, got an object with 1 keys"),
    (_part(tail=[5, 7]), "tail = [5, 7] is not a range within [0, 6]"),
    (_part(body=[3, 5]), "do not cover 0..6 in order"),
    (_without(GOOD_PART, "fingerprint"), "fingerprint is missing"),
    (_without(GOOD_PART, "format_version"), "format_version is missing"),
    (_part(fingerprint="x" * 64), "fingerprint = 'xxxx"),
    (_part(model_type="qwen2\n\x1b[2J\x1b[31mOK"), r"model_type = 'qwen2\n\x1b[2J"),
    (_part(role="device\r\nX-Evil: 1"), r"role = 'device\r\nX-Evil: 1' is not one of device, cloud, full"),
    (_part(dtype="float64"), "dtype = 'float64' is not one of"),
    (_part(dtype=None), "dtype must be a string, got None"),
    (_part(files=["config.json"]), "files must map"),
    (_part(files={"../../etc/passwd": "cd" * 32}), "files lists '../../etc/passwd', which is not a plain relative"),
    (_part(files={"/abs": "cd" * 32}), "not a plain relative"),
    (_part(files={"config.json": "zz"}), "files gives 'zz' for 'config.json', not a sha256 digest"),
    (_part(format_version=3), "format_version is 3; this lambdasplit reads 2 (from a newer lambdasplit"),
    ([1, 2], "expected a JSON object, got [1, 2]"),
    (None, "expected a JSON object, got None"),
    ("manifest", "expected a JSON object, got 'manifest'"),
]


def _assert_one_clean_line(message: str) -> None:
    assert "\n" not in message and "\r" not in message and "\x1b" not in message, repr(message)
    assert message.isascii() and message.isprintable(), repr(message)


@pytest.mark.parametrize("data,message", HOSTILE_PARTS)
def test_hostile_part_manifest_is_a_wire_error(data, message):
    with pytest.raises(WireError) as caught:
        PartManifest.from_dict(data)
    text = str(caught.value)
    assert text.startswith("malformed part manifest: ") and message in text, text
    _assert_one_clean_line(text)


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(k=float("inf")), "k must be an integer, got inf"),
        (dict(k=65), "k = 65 is outside [0, 64]"),
        (dict(family="sd3\x1b]0;pwn\x07"), r"family = 'sd3\x1b]0;pwn\x07' is not one of sd, sdxl"),
        (dict(mode=["paper"]), "mode must be a string, got ['paper']"),
        (dict(files={"unet\\..\\x": "01" * 32}), "not a plain relative file name"),
        (dict(format_version=1), "format_version is 1; this lambdasplit reads 2 (it predates"),
    ],
)
def test_hostile_pipeline_manifest_is_a_wire_error(changes, message):
    from lambdasplit.diffusion.parts import PipelineManifest

    with pytest.raises(WireError) as caught:
        PipelineManifest.from_dict({**GOOD_PIPELINE, **changes})
    text = str(caught.value)
    assert text.startswith("malformed pipeline manifest: ") and message in text, text
    _assert_one_clean_line(text)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from([GOOD_PART, {}]),
    changes=st.dictionaries(st.sampled_from(sorted(GOOD_PART)) | st.text(max_size=6), JSON, max_size=5),
    dropped=st.sets(st.sampled_from(sorted(GOOD_PART)), max_size=2),
)
def test_part_manifest_from_dict_never_raises_anything_but_wire_error(base, changes, dropped):
    data = {k: v for k, v in {**base, **changes}.items() if k not in dropped}
    try:
        manifest = PartManifest.from_dict(data)
    except WireError as exc:
        _assert_one_clean_line(str(exc))
        return
    # Accepted: then it is well-formed, round-trips, and its derived values work.
    assert PartManifest.from_dict(manifest.as_dict()) == manifest
    assert manifest.spec.layers == manifest.layers and manifest.frame_limits().hidden_size == manifest.hidden_size
    problem = manifest.compatible_with(PartManifest.from_dict(GOOD_PART))
    assert problem is None or (problem.split(" differs: ")[0] in PartManifest.MATCH and "\n" not in problem)


@given(data=JSON)
@settings(max_examples=200, deadline=None)
def test_any_json_value_as_a_manifest_is_a_wire_error(data):
    from lambdasplit.diffusion.parts import PipelineManifest

    for cls in (PartManifest, PipelineManifest):
        with pytest.raises(WireError):
            cls.from_dict(data)


def test_one_manifest_contract_for_text_and_diffusion():
    from lambdasplit.diffusion.parts import PipelineManifest

    device, pipeline = PartManifest.from_dict(GOOD_PART), PipelineManifest.from_dict(GOOD_PIPELINE)
    for manifest in (device, pipeline):
        assert isinstance(manifest, Manifest)
        assert type(manifest).from_dict(manifest.as_dict()) == manifest
        assert manifest.compatible_with(manifest) is None
    assert device.frame_limits(1000, 8).hidden_size == 64 and device.frame_limits(1000, 8).max_tokens == 8
    assert pipeline.frame_limits().hidden_size is None and pipeline.frame_limits().max_elements == 1 << 30
    assert device.summary() == "layers 2..4"
    assert pipeline.summary() == "sdxl unet-split: the UNet's inner blocks (K=1)"
    assert device.compatible_with(pipeline) == (
        "kind differs: the device's parts have a language model, the server's body has a diffusion pipeline"
    )


def test_mismatch_message_names_the_server_and_the_device():
    device = PartManifest.from_dict(GOOD_PART)
    server = PartManifest.from_dict(_part(role="cloud", head=[0, 1], body=[1, 5]))
    assert server.compatible_with(device) == "head differs: the server's body has (0, 1), the device's parts have (0, 2)"
    assert device.compatible_with(server) == "head differs: the device's parts have (0, 2), the server's body has (0, 1)"
    other = PartManifest.from_dict(_part(dtype="bfloat16"))
    assert device.compatible_with(other) == (
        "dtype differs: the device's parts (here) have float32, the device's parts (there) have bfloat16"
    )


def test_server_answers_a_hostile_hello_manifest_with_a_protocol_error(tiny_models):
    from websockets.sync.client import connect

    from lambdasplit.cloud.process import ServerProcess
    from lambdasplit.wire.frame import Frame, MsgType, parse_frame
    from lambdasplit.wire.protocol import BODY_PATH, PROTOCOL

    hello = json.dumps({"protocol": PROTOCOL, "manifest": _part(role="cloud", layers=12345)})
    hostile = [  # raw JSON: 1e400 parses to float inf, 5000 digits to a huge int (or the wire layer refuses them)
        (hello.replace("12345", "1e400"), ("malformed part manifest: layers", "control message is not valid JSON")),
        (hello.replace("12345", "1" * 5000), ("malformed part manifest: layers", "control message is not valid JSON")),
        (hello.replace("12345", '"6"'), ("malformed part manifest: layers must be an integer, got '6'",)),
        (json.dumps({"protocol": PROTOCOL, "manifest": _part(model_type="x\n\x1b[31m")}),
         ("malformed part manifest: model_type = 'x\\n\\x1b[31m' is not a valid value",)),
        (json.dumps({"protocol": PROTOCOL, "manifest": [1, 2]}), ("malformed part manifest: expected a JSON object",)),
    ]
    with ServerProcess("--model", str(tiny_models["qwen2"]), "--split", "2,1") as proc:
        assert "(layers 2..4)" in "".join(proc.output)
        for raw, expected in hostile:
            with connect(proc.url + BODY_PATH) as ws:
                ws.send(Frame(MsgType.HELLO, payload=raw.encode()).to_bytes())
                error = parse_frame(ws.recv())
                body = json.loads(error.payload)
                assert error.type == MsgType.ERROR and body["code"] == "protocol", body
                assert body["message"].startswith(expected), body
                _assert_one_clean_line(body["message"])

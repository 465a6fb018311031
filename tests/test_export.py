"""Exported parts hold only their own tensors, load only those, and still reproduce the model."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from lambdasplit.device.body import load_local_body
from lambdasplit.device.runtime import SplitDevice
from lambdasplit.device.sampling import SamplingConfig
from lambdasplit.errors import SourceError, SplitError
from lambdasplit.split.export import export_parts
from lambdasplit.split.manifest import PartManifest
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
    assert set(device["files"]) == {"model.safetensors"}


def test_exported_parts_reproduce_the_unsplit_model(exported, tiny_models):
    device = SplitDevice.load(exported["device"])
    body = load_local_body(exported["cloud"])
    ids = torch.tensor([[1, 22, 333, 4444, 5555, 66]])
    result = device.generate_ids(body, ids, None, SamplingConfig(max_new_tokens=8))
    ref = oracle(tiny_models["qwen2"]).generate(ids, max_new_tokens=8, do_sample=False)
    assert result.token_ids[0] == ref[0, ids.shape[1]:].tolist()
    cloud = PartManifest.read(exported["cloud"])
    assert device.manifest.compatible_with(cloud) is None
    other = SplitDevice.load(tiny_models["qwen2"], (1, 1)).manifest
    assert "head" in other.compatible_with(cloud)


def test_wrong_part_or_split_is_refused(exported):
    with pytest.raises(SourceError, match="cloud part"):
        SplitDevice.load(exported["cloud"])
    with pytest.raises(SourceError, match="device part"):
        load_local_body(exported["device"])
    with pytest.raises(SplitError, match="exported with split 2,1"):
        SplitDevice.load(exported["device"], (1, 1))


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
from lambdasplit.device.body import LocalBody
from lambdasplit.device.runtime import SplitDevice
kind, path, tokenizer_dir = sys.argv[1:]
transformers.AutoTokenizer.from_pretrained(tokenizer_dir)  # both sides need one: not part of the comparison
ids = torch.arange(1, 9)[None]
base = psutil.Process().memory_info().rss
if kind == "device":
    device = SplitDevice.load(path)
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

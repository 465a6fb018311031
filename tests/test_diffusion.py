"""Split diffusion against the unsplit diffusers pipeline as the oracle: same seed, same image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lambdasplit.cloud.process import ServerProcess
from lambdasplit.diffusion.device import SplitPipeline
from lambdasplit.diffusion.parts import export_pipeline, unet_fingerprint
from lambdasplit.diffusion.tiny import build_tiny_pipeline, default_pipeline_dir
from lambdasplit.errors import LambdaSplitError
from lambdasplit.wire.codec import Codec

PROMPT = "a lighthouse at dusk, oil painting"
STEPS = 3
SPLITS = [("paper", 0), ("unet-split", 1), ("unet-split", 2)]
TOKEN = "diffusion-token-0123456789abcdef"


@pytest.fixture(scope="module", params=["sdxl", "sd"])
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def pipelines() -> dict[str, Path]:
    return {f: default_pipeline_dir(f) for f in ("sdxl", "sd")}


_REFERENCE: dict[tuple, np.ndarray] = {}


def reference(directory: Path, seed: int = 1, guidance: float = 5.0) -> np.ndarray:
    """The unsplit pipeline's image, as floats."""
    key = (directory, seed, guidance)
    if key not in _REFERENCE:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(str(directory))
        pipe.set_progress_bar_config(disable=True)
        out = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=guidance,
                   generator=torch.Generator().manual_seed(seed), output_type="np")
        _REFERENCE[key] = out.images[0]
    return _REFERENCE[key]


def split_image(pipe: SplitPipeline, seed: int = 1, guidance: float = 5.0) -> np.ndarray:
    return pipe.generate(PROMPT, STEPS, guidance, seed, output_type="np").image


@pytest.mark.parametrize("mode,k", SPLITS)
def test_split_image_equals_the_unsplit_pipeline(pipelines, family, mode, k):
    pipe = SplitPipeline.load(pipelines[family], mode, k)
    got = split_image(pipe)
    want = reference(pipelines[family])
    assert got.shape == want.shape == (64, 64, 3)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert want.std() > 0.01  # a real picture, not a constant


def test_without_guidance_the_cloud_skips_cfg(pipelines):
    pipe = SplitPipeline.load(pipelines["sdxl"], "paper")
    np.testing.assert_allclose(split_image(pipe, guidance=1.0), reference(pipelines["sdxl"], guidance=1.0), atol=1e-6)


def test_unet_split_keeps_latents_and_noise_on_the_device(pipelines):
    """Frame sizes tell what crossed: in unet-split the uplink carries the K-th block's activations
    (not the 4-channel latents) and the downlink is not a noise prediction."""
    pipe = SplitPipeline.load(pipelines["sdxl"], "unet-split", 1)
    pipe.unet.link.start_capture()
    split_image(pipe)
    from lambdasplit.diffusion.protocol import Slot
    from lambdasplit.wire.frame import Limits, parse_frame

    limits = Limits(max_elements=1 << 30, max_payload=1 << 31)
    slots = {Slot(parse_frame(data, limits).slot) for _, data in pipe.unet.link.captured}
    assert Slot.SAMPLE not in slots and Slot.NOISE not in slots and Slot.TIMESTEP not in slots
    assert {Slot.TEXT, Slot.EMB, Slot.HIDDEN} <= slots


def test_bad_k_is_a_clear_error(pipelines):
    with pytest.raises(LambdaSplitError, match="choose K in 1..2"):
        SplitPipeline.load(pipelines["sdxl"], "unet-split", 3)


@pytest.mark.parametrize("steps", [0, -3])
def test_a_step_count_below_one_is_refused(pipelines, steps):
    """0 divided by zero inside diffusers; -3 quietly ran no step and "succeeded"."""
    pipe = SplitPipeline.load(pipelines["sdxl"], "paper")
    with pytest.raises(LambdaSplitError, match=f"steps must be at least 1, not {steps}"):
        pipe.generate(PROMPT, steps)


def test_the_tiny_pipeline_is_deterministic(tmp_path, pipelines):
    again = build_tiny_pipeline("sdxl", tmp_path / "again")
    assert unet_fingerprint(again / "unet") == unet_fingerprint(pipelines["sdxl"] / "unet")


@pytest.mark.parametrize("codec,min_psnr", [(Codec.FP16, 40.0), (Codec.BF16, 25.0), (Codec.INT8, 20.0)])
def test_lossy_codecs_cost_little_image_quality(pipelines, codec, min_psnr):
    from lambdasplit.diffusion.quality import psnr, ssim

    want = reference(pipelines["sdxl"])
    pipe = SplitPipeline.load(pipelines["sdxl"], "unet-split", 1, codec=codec)
    got = split_image(pipe)
    assert not np.array_equal(got, want)  # the codec really was lossy
    assert psnr(got, want) >= min_psnr
    assert ssim(got, want) >= 0.9


def test_quality_metrics():
    from lambdasplit.diffusion.quality import psnr, ssim

    rng = np.random.default_rng(0)
    a = rng.random((32, 32, 3)).astype(np.float32)
    assert psnr(a, a) == float("inf") and ssim(a, a) == pytest.approx(1.0)
    noisy = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1).astype(np.float32)
    assert 15 < psnr(noisy, a) < 25 and ssim(noisy, a) < 0.95


@pytest.mark.parametrize("mode,k", [("paper", 0), ("unet-split", 2)])
def test_over_the_network_with_a_token(pipelines, family, mode, k, tmp_path):
    token = tmp_path / "token"
    token.write_text(TOKEN)
    args = ["--pipeline", str(pipelines[family]), "--mode", mode, "--k", str(k), "--token-file", str(token)]
    with ServerProcess(*args) as proc:
        assert f"{family} {mode}" in "".join(proc.output)
        pipe = SplitPipeline.load(pipelines[family], mode, k, server=proc.url, token=TOKEN)
        got = split_image(pipe)
        again = split_image(pipe, seed=2)  # a second image on the same connection: a fresh session state
        pipe.close()
        with pytest.raises(LambdaSplitError, match="token"):
            SplitPipeline.load(pipelines[family], mode, k, server=proc.url, token="wrong").generate(PROMPT, 1)
    np.testing.assert_allclose(got, reference(pipelines[family]), atol=1e-6)
    np.testing.assert_allclose(again, reference(pipelines[family], seed=2), atol=1e-6)


def test_over_tls_and_refused_without_the_ca(pipelines, tmp_path):
    from lambdasplit.security import make_certificates

    paths = make_certificates(tmp_path, ["localhost", "127.0.0.1"])
    args = ("--pipeline", str(pipelines["sdxl"]), "--mode", "unet-split", "--k", "1",
            "--tls-cert", str(paths["cert"]), "--tls-key", str(paths["key"]))
    with ServerProcess(*args) as proc:
        assert proc.url.startswith("wss://")
        pipe = SplitPipeline.load(pipelines["sdxl"], "unet-split", 1, server=proc.url, tls_ca=paths["ca"])
        np.testing.assert_allclose(split_image(pipe), reference(pipelines["sdxl"]), atol=1e-6)
        pipe.close()
        untrusted = SplitPipeline.load(pipelines["sdxl"], "unet-split", 1, server=proc.url)
        with pytest.raises(LambdaSplitError, match="TLS"):
            untrusted.generate(PROMPT, 1)


def test_server_killed_mid_image_the_device_reconnects_and_replays_the_conditioning(pipelines):
    args = ("--pipeline", str(pipelines["sdxl"]), "--mode", "paper")
    first = ServerProcess(*args)
    restarted: list[ServerProcess] = []
    pipe = SplitPipeline.load(pipelines["sdxl"], "paper", server=first.url)
    pipe.unet.link.backoff = 0.2

    def kill_after_first_step(step, total, latents):
        if step == 1:
            first.kill()
            restarted.append(ServerProcess(*args, port=first.port))

    try:
        got = pipe.generate(PROMPT, STEPS, 5.0, 1, on_step=kill_after_first_step, output_type="np").image
    finally:
        pipe.close()
        first.stop()
        for proc in restarted:
            proc.stop()
    assert pipe.unet.link.reconnects == 1
    np.testing.assert_allclose(got, reference(pipelines["sdxl"]), atol=1e-6)


def test_mode_mismatch_is_refused(pipelines):
    with ServerProcess("--pipeline", str(pipelines["sdxl"]), "--mode", "paper") as proc:
        pipe = SplitPipeline.load(pipelines["sdxl"], "unet-split", 1, server=proc.url)
        with pytest.raises(LambdaSplitError, match="mode differs"):
            pipe.generate(PROMPT, 1)


def test_a_wrong_slot_closes_only_that_session(pipelines):
    from websockets.sync.client import connect

    from lambdasplit.diffusion.parts import open_pipeline
    from lambdasplit.diffusion.protocol import Slot
    from lambdasplit.wire.frame import MsgType, parse_frame, tensor_frame
    from lambdasplit.wire.protocol import BODY_PATH, PROTOCOL, control_frame, read_control

    manifest = open_pipeline(pipelines["sdxl"], "paper", 0).manifest("device", "paper", 0, torch.float32)
    with ServerProcess("--pipeline", str(pipelines["sdxl"]), "--mode", "paper") as proc:
        with connect(proc.url + BODY_PATH) as ws:
            ws.send(control_frame(MsgType.HELLO, {"protocol": PROTOCOL, "manifest": manifest.as_dict()}).to_bytes())
            session = bytes.fromhex(read_control(parse_frame(ws.recv()), MsgType.WELCOME)["session"])
            ws.send(tensor_frame(MsgType.TENSOR, torch.zeros(2, 4, 8, 8), Codec.FP32, session, 1, slot=Slot.HIDDEN).to_bytes())
            error = parse_frame(ws.recv())
            assert error.type == MsgType.ERROR and b"HIDDEN is not sent in paper mode" in error.payload
        with connect(proc.url + BODY_PATH) as ws:  # the right slot with the wrong number of channels
            ws.send(control_frame(MsgType.HELLO, {"protocol": PROTOCOL, "manifest": manifest.as_dict()}).to_bytes())
            session = bytes.fromhex(read_control(parse_frame(ws.recv()), MsgType.WELCOME)["session"])
            ws.send(tensor_frame(MsgType.TENSOR, torch.zeros(2, 77, 64), Codec.FP32, session, 0, slot=Slot.TEXT).to_bytes())
            ws.send(tensor_frame(MsgType.TENSOR, torch.zeros(1), Codec.FP32, session, 0, slot=Slot.TIMESTEP).to_bytes())
            ws.send(tensor_frame(MsgType.TENSOR, torch.zeros(2, 3, 8, 8), Codec.FP32, session, 1, slot=Slot.SAMPLE).to_bytes())
            error = parse_frame(ws.recv())
            assert error.type == MsgType.ERROR and b"SAMPLE must have shape * x 4 x * x *" in error.payload
        pipe = SplitPipeline.load(pipelines["sdxl"], "paper", server=proc.url)  # the server still serves others
        np.testing.assert_allclose(split_image(pipe), reference(pipelines["sdxl"]), atol=1e-6)


def test_exported_parts_hold_only_their_own_weights(pipelines, tmp_path):
    written = export_pipeline(pipelines["sdxl"], "unet-split", 1, tmp_path)

    def keys(part: str) -> set[str]:
        path = written[part] / "unet" / "diffusion_pytorch_model.safetensors"
        with safe_open(str(path), framework="pt") as handle:
            return set(handle.keys())

    device, cloud = keys("device"), keys("cloud")
    assert not device & cloud
    assert all(k.startswith(("down_blocks.1.", "down_blocks.2.", "mid_block.", "up_blocks.0.", "up_blocks.1.")) for k in cloud)
    assert any(k.startswith("conv_in.") for k in device) and not any(k.startswith("mid_block.") for k in device)
    assert not (written["cloud"] / "vae").exists() and (written["device"] / "vae").is_dir()
    manifest = json.loads((written["device"] / "manifest.json").read_text())
    assert manifest["mode"] == "unet-split" and manifest["k"] == 1
    with ServerProcess("--pipeline", str(written["cloud"]), "--mode", "unet-split", "--k", "1") as proc:
        pipe = SplitPipeline.load(written["device"], "unet-split", 1, server=proc.url)
        np.testing.assert_allclose(split_image(pipe), reference(pipelines["sdxl"]), atol=1e-6)


def test_paper_export_leaves_no_unet_weights_on_the_device(pipelines, tmp_path):
    written = export_pipeline(pipelines["sd"], "paper", 0, tmp_path)
    assert not list((written["device"] / "unet").glob("*.safetensors"))
    assert (written["cloud"] / "unet" / "diffusion_pytorch_model.safetensors").is_file()


CLI = [sys.executable, "-m", "lambdasplit.cli"]


@pytest.mark.parametrize("mode", ["paper", "unet-split"])
def test_image_command_as_a_new_user_runs_it(tmp_path, mode):
    """No --pipeline: the small offline SDXL-shaped pipeline; in-process, then through a server."""
    from PIL import Image

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    local = tmp_path / "local.png"
    proc = subprocess.run([*CLI, "image", "a red fox", "--mode", mode, "--steps", "3", "--out", str(local)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "B per step" in proc.stdout
    with ServerProcess("--pipeline", "tiny-sdxl", "--mode", mode) as server:
        remote = tmp_path / "remote.png"
        proc = subprocess.run([*CLI, "image", "a red fox", "--mode", mode, "--steps", "3", "--out", str(remote),
                               "--server", server.url], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
    from diffusers import DiffusionPipeline

    unsplit = DiffusionPipeline.from_pretrained(str(default_pipeline_dir("sdxl")))
    unsplit.set_progress_bar_config(disable=True)
    want = np.asarray(unsplit("a red fox", num_inference_steps=3, guidance_scale=5.0,
                              generator=torch.Generator().manual_seed(0)).images[0])
    a, b = np.asarray(Image.open(local)), np.asarray(Image.open(remote))
    assert a.shape == (64, 64, 3) and np.array_equal(a, want) and np.array_equal(b, want)


def test_leakage_paper_mode_gives_the_image_away_and_unet_split_less(pipelines):
    """The audit's attacks on captured frames: paper mode replays to the exact image; inverting the
    outer blocks at K = 1 recovers the structure (far above the blind guess), and less at K = 2."""
    from lambdasplit.privacy.diffusion import measure

    paper = measure(str(pipelines["sdxl"]), "paper", 0, PROMPT, steps=6)
    assert paper.psnr >= 60 and paper.ssim > 0.999
    k1 = measure(str(pipelines["sdxl"]), "unet-split", 1, PROMPT, steps=6, iterations=200)
    k2 = measure(str(pipelines["sdxl"]), "unet-split", 2, PROMPT, steps=6, iterations=200)
    assert k1.ssim > k1.baseline_ssim + 0.3 and k1.psnr > k1.baseline_psnr + 3
    assert k2.ssim < k1.ssim

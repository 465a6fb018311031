"""Small SDXL-shaped and SD-shaped pipelines built offline from configs with seeded random weights.

No registry package ships diffusion weights, so tests, the demo and `lambdasplit image` without
`--pipeline` use these: the real architectures (two CLIP text encoders, a UNet with the SDXL block
layout and added time/text conditioning, a KL VAE, Euler) at toy widths, saved as a normal diffusers
directory. The CLIP tokenizer is written locally (byte-level vocabulary, no merges).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FAMILIES = ("sdxl", "sd")
_SEED = 0
_BUILD_VERSION = "1"  # bump when the configs below change, so cached pipelines are rebuilt


def _text_config(projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
        layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=3, vocab_size=600,
        hidden_act="gelu", projection_dim=projection_dim, max_position_embeddings=77,
    )


def _unet(family: str):
    from diffusers import UNet2DConditionModel

    common = dict(
        block_out_channels=(32, 64, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        norm_num_groups=8, attention_head_dim=(2, 4, 4),
    )
    if family == "sdxl":
        # SDXL's layout: no attention in the outer block, text+time ids added to the time embedding.
        return UNet2DConditionModel(
            **common,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + 32, cross_attention_dim=64,
        )
    return UNet2DConditionModel(
        **common,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
    )


def byte_tokenizer():
    """A CLIP tokenizer over single bytes (no merges): every character is a token."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_tiny_pipeline(family: str, directory: Path, seed: int = _SEED) -> Path:
    """Build and save a seeded `family` ("sdxl" or "sd") pipeline in `directory`."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if family not in FAMILIES:
        raise ValueError(f"unknown pipeline family {family!r}; expected one of {FAMILIES}")
    directory = Path(directory)
    torch.manual_seed(seed)
    unet = _unet(family)
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, norm_num_groups=8, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=64,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
    )
    tokenizer = byte_tokenizer()
    text_encoder = CLIPTextModel(_text_config())
    if family == "sdxl":
        text_encoder_2 = CLIPTextModelWithProjection(_text_config())
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.save_pretrained(str(directory))
    (directory / ".lambdasplit-tiny").write_text(_BUILD_VERSION)
    return directory


def default_pipeline_dir(family: str = "sdxl") -> Path:
    """The small offline pipeline, built once (deterministically) and cached."""
    root = Path(os.environ.get("LAMBDASPLIT_CACHE", Path.home() / ".cache" / "lambdasplit")) / "pipelines"
    directory = root / f"tiny-{family}"
    stamp = directory / ".lambdasplit-tiny"
    if not (stamp.is_file() and stamp.read_text() == _BUILD_VERSION):
        log.info("building the small offline %s pipeline in %s", family, directory)
        partial = root / f".tiny-{family}.partial-{os.getpid()}"
        build_tiny_pipeline(family, partial)
        if directory.exists():
            import shutil

            shutil.rmtree(directory)
        partial.rename(directory)
    return directory

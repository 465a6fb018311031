"""Cut a diffusers UNet2DConditionModel into outer blocks (device) and inner blocks (cloud).

The three stages call the UNet's own submodules and helper methods in the order of its forward(), so
outer_in -> inner -> outer_out computes exactly what unet(...) computes. K counts down blocks kept on
the device (and as many up blocks at the other end); skip connections of the outer blocks never
leave the device. Features the split does not carry (ControlNet residuals, adapters, attention
masks, GLIGEN) are refused rather than silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lambdasplit.errors import SplitError


@dataclass
class OuterState:
    """What the device keeps between outer_in and outer_out for one UNet call."""

    residuals: tuple[torch.Tensor, ...]
    emb: torch.Tensor
    encoder_hidden_states: torch.Tensor


def block_count(unet) -> int:
    return len(unet.down_blocks)


def check_k(unet, k: int) -> None:
    """K in 1..n-1, where every outer down block ends in a downsampler (so the outer up blocks'
    skip connections are exactly the device's, plus the tensor it sends up)."""
    n = block_count(unet)
    if not 1 <= k <= n - 1:
        raise SplitError(f"unet-split K={k}: this UNet has {n} down blocks; choose K in 1..{n - 1}")
    kept = 1 + sum(len(block.resnets) + (1 if block.downsamplers else 0) for block in unet.down_blocks[:k])
    used = sum(len(block.resnets) for block in unet.up_blocks[n - k :])
    if kept != used + 1:
        raise SplitError(f"unet-split K={k}: the outer blocks' skip connections do not pair up ({kept} vs {used} + 1)")


def outer_keys(unet, k: int) -> list[str]:
    """State-dict keys of the device's outer UNet modules."""
    inner = inner_prefixes(unet, k)
    return [key for key in unet.state_dict() if not key.startswith(inner)]


def inner_prefixes(unet, k: int) -> tuple[str, ...]:
    n = block_count(unet)
    return (
        *(f"down_blocks.{i}." for i in range(k, n)),
        "mid_block.",
        *(f"up_blocks.{i}." for i in range(n - k)),
    )


def inner_keys(unet, k: int) -> list[str]:
    prefixes = inner_prefixes(unet, k)
    return [key for key in unet.state_dict() if key.startswith(prefixes)]


def _check_size(unet, sample: torch.Tensor) -> None:
    factor = 2**unet.num_upsamplers
    if any(dim % factor for dim in sample.shape[-2:]):
        raise SplitError(
            f"latent size {tuple(sample.shape[-2:])} is not a multiple of {factor}; unet-split needs image sizes "
            f"that are multiples of {factor} x the VAE scale factor"
        )


def outer_in(
    unet, k: int, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
    added_cond_kwargs: dict | None = None, timestep_cond: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, OuterState]:
    """conv_in, the time (and added text/time) embedding and the first K down blocks.

    Returns (h, emb, encoder_hidden_states, state): the first three go to the cloud.
    """
    _check_size(unet, sample)
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, timestep_cond)
    class_emb = unet.get_class_embed(sample=sample, class_labels=None)
    if class_emb is not None:
        raise SplitError("class-conditioned UNets are not supported by unet-split")
    aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs or {})
    if unet.config.addition_embed_type == "image_hint":
        raise SplitError("image-hint UNets are not supported by unet-split")
    emb = emb + aug_emb if aug_emb is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(
        encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs or {}
    )
    h = unet.conv_in(sample)
    residuals: tuple[torch.Tensor, ...] = (h,)
    for block in unet.down_blocks[:k]:
        h, res = down_block(block, h, emb, encoder_hidden_states)
        residuals += res
    # The last residual is h itself: the cloud receives it as its input and uses it as a skip too.
    return h, emb, encoder_hidden_states, OuterState(residuals[:-1], emb, encoder_hidden_states)


def inner(unet, k: int, h: torch.Tensor, emb: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    """The cloud's part: down blocks K.., the mid block and the first n-K up blocks."""
    n = block_count(unet)
    residuals: tuple[torch.Tensor, ...] = (h,)
    for block in unet.down_blocks[k:]:
        h, res = down_block(block, h, emb, encoder_hidden_states)
        residuals += res
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            h = unet.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)
        else:
            h = unet.mid_block(h, emb)
    for block in unet.up_blocks[: n - k]:
        take = len(block.resnets)
        res, residuals = residuals[-take:], residuals[:-take]
        h = up_block(block, h, emb, res, encoder_hidden_states)
    if residuals:
        raise SplitError("internal: the inner blocks left skip connections unused")
    return h


def outer_out(unet, k: int, h: torch.Tensor, state: OuterState) -> torch.Tensor:
    """The last K up blocks (with the device's skip connections), then conv_norm_out and conv_out."""
    n = block_count(unet)
    residuals = state.residuals
    for block in unet.up_blocks[n - k :]:
        take = len(block.resnets)
        res, residuals = residuals[-take:], residuals[:-take]
        h = up_block(block, h, state.emb, res, state.encoder_hidden_states)
    if unet.conv_norm_out:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)


def down_block(block, h, emb, encoder_hidden_states):
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
    return block(hidden_states=h, temb=emb)


def up_block(block, h, emb, res, encoder_hidden_states):
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=encoder_hidden_states)
    return block(hidden_states=h, temb=emb, res_hidden_states_tuple=res)

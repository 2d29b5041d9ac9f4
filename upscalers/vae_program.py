"""diffusers' VAE decoder (AutoencoderKL: SD x4, SD3) as a program for the layered exact decode.

Read from the module tree by attribute (conv_in, a middle block of residual blocks around one self-attention,
up blocks of residual blocks and an upsampler, conv_norm_out, conv_act, conv_out; tiling/decoder_program.py
says what a program is). Anything else raises NotAProgram and the decode keeps its statistics pass; the
program's probe (run before any decode) refuses one that does not reproduce the decoder, so a diffusers
release that changes the forward cannot slip through.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..tiling.decoder_program import ADD, ATTENTION, LOCAL, NORM, SAVE, NotAProgram, Step


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise NotAProgram(what)


def _resnet(block) -> list[Step]:
    _need(type(block).__name__ == "ResnetBlock2D", f"a {type(block).__name__} where a ResnetBlock2D was expected")
    _need(block.upsample is None and block.downsample is None and block.time_emb_proj is None,
          "a residual block that resamples or takes a time embedding")
    _need(block.time_embedding_norm in ("default", "group"), f"time_embedding_norm {block.time_embedding_norm!r}")
    _need(isinstance(block.norm1, torch.nn.GroupNorm) and isinstance(block.norm2, torch.nn.GroupNorm),
          "a residual block without GroupNorms")
    return [Step(SAVE), Step(NORM, block.norm1), Step(LOCAL, block.nonlinearity), Step(LOCAL, block.conv1),
            Step(NORM, block.norm2), Step(LOCAL, block.nonlinearity), Step(LOCAL, block.dropout),
            Step(LOCAL, block.conv2), Step(ADD, block.conv_shortcut, float(block.output_scale_factor))]


def _attention(attn) -> Step:
    _need(type(attn).__name__ == "Attention", f"a {type(attn).__name__} in the middle block")
    _need(isinstance(getattr(attn, "group_norm", None), torch.nn.GroupNorm) and attn.spatial_norm is None,
          "a middle attention without its own GroupNorm")
    return Step(ATTENTION, attn, norm=attn.group_norm, width=attn.to_q.out_features)


def vae_decoder_program(vae, finish: Callable[[torch.Tensor], torch.Tensor]) -> list[Step]:
    """The steps of `vae.decode(z)` followed by `finish` (the caller's scaling to 0..1)."""
    dec = getattr(vae, "decoder", None)
    _need(dec is not None and type(dec).__name__ == "Decoder", "no diffusers Decoder")
    _need(isinstance(dec.conv_norm_out, torch.nn.GroupNorm), "a spatial-norm decoder")
    _need(not getattr(vae, "use_tiling", False) and not getattr(vae, "use_slicing", False), "diffusers' own tiling")
    steps: list[Step] = []
    if getattr(vae, "post_quant_conv", None) is not None:
        steps.append(Step(LOCAL, vae.post_quant_conv))
    steps.append(Step(LOCAL, dec.conv_in))
    mid = dec.mid_block
    steps += _resnet(mid.resnets[0])
    for attn, block in zip(mid.attentions, mid.resnets[1:]):
        if attn is not None:
            steps.append(_attention(attn))
        steps += _resnet(block)
    for up in dec.up_blocks:
        _need(type(up).__name__ == "UpDecoderBlock2D", f"a {type(up).__name__} up block")
        for block in up.resnets:
            steps += _resnet(block)
        for upsampler in up.upsamplers or []:
            steps.append(Step(LOCAL, upsampler))
    steps += [Step(NORM, dec.conv_norm_out), Step(LOCAL, dec.conv_act), Step(LOCAL, dec.conv_out), Step(LOCAL, finish)]
    return steps

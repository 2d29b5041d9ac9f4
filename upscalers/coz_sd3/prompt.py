"""SD3 prompt embeddings as the authors make them (diffusers' encode_prompt without guidance, T5 at 512).

CLIP-L and CLIP-G: 77 tokens, penultimate hidden state, pooled = text_embeds. T5: 512 tokens, no mask
(zeros when there is no T5, as diffusers does). seq = [CLIP-L | CLIP-G] zero-padded to the joint width,
then T5 on the sequence axis -> (1, 77 + 512, 4096); pooled = [L | G] -> (1, 2048).
"""
from __future__ import annotations

import torch

from . import configs
from .components import CoZComponents


def _ids(tokenizer, text: str, length: int, device) -> torch.Tensor:
    return tokenizer([text], padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def _clip(model, tokenizer, text: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(_ids(tokenizer, text, configs.CLIP_TOKENS, device), output_hidden_states=True)
    return out.hidden_states[-2], out.text_embeds


def encode_prompt(comps: CoZComponents, text: str, device: torch.device, joint_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence (1, 77 + 512, joint_dim), pooled (1, 2048)) in float32 on `device`."""
    seq_l, pooled_l = _clip(comps.clip_l, comps.tokenizers["clip_l"], text, device)
    seq_g, pooled_g = _clip(comps.clip_g, comps.tokenizers["clip_g"], text, device)
    clip = torch.cat([seq_l.float(), seq_g.float()], dim=-1)
    clip = torch.nn.functional.pad(clip, (0, joint_dim - clip.shape[-1]))
    if comps.t5 is not None:
        t5 = comps.t5(_ids(comps.tokenizers["t5"], text, configs.T5_TOKENS, device))[0].float()
    else:
        t5 = torch.zeros(1, configs.T5_TOKENS, joint_dim, device=device)
    return torch.cat([clip, t5], dim=-2), torch.cat([pooled_l.float(), pooled_g.float()], dim=-1)

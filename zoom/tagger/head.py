"""RAM's tagging head (the Query2Label decoder), written out because transformers' BERT does not fit it.

Per layer, with the label queries h (C, hidden) and the projected image tokens m (T, width):
  a = LayerNorm(dense(softmax(Q(h) K(m)^T / sqrt(d)) V(m)) + h)       cross-attention only, K/V: width -> hidden
  h = LayerNorm(dense_out(GELU(dense_in(a))) + a)                     erf GELU, LayerNorm eps 1e-12
No embeddings and no self-attention (RAM deletes them). Module names follow the checkpoint's keys
(`tagging_head.encoder.layer.N.crossattention.self.query` ...), so its state dict loads as is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HEADS = 4  # RAM's q2l_config: 4 heads (not readable from the weights)
LAYER_NORM_EPS = 1e-12


class _Projections(nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(width, hidden)
        self.value = nn.Linear(width, hidden)


class _Output(nn.Module):
    """dense, then LayerNorm over (dense output + residual)."""

    def __init__(self, inner: int, hidden: int):
        super().__init__()
        self.dense = nn.Linear(inner, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class CrossAttention(nn.Module):
    def __init__(self, hidden: int, width: int, heads: int = HEADS):
        super().__init__()
        self.heads = heads
        self.self = _Projections(hidden, width)
        self.output = _Output(hidden, hidden)

    def forward(self, h: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        def split(x):  # (B, L, hidden) -> (B, heads, L, d)
            return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        p = self.self
        context = F.scaled_dot_product_attention(split(p.query(h)), split(p.key(memory)), split(p.value(memory)))
        return self.output(context.transpose(1, 2).flatten(2), h)


class _Intermediate(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.dense = nn.Linear(hidden, inner)


class HeadLayer(nn.Module):
    def __init__(self, hidden: int, width: int, inner: int, heads: int = HEADS):
        super().__init__()
        self.crossattention = CrossAttention(hidden, width, heads)
        self.intermediate = _Intermediate(hidden, inner)
        self.output = _Output(inner, hidden)

    def forward(self, h: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        a = self.crossattention(h, memory)
        return self.output(F.gelu(self.intermediate.dense(a)), a)


class _Encoder(nn.Module):
    def __init__(self, layers: list[HeadLayer]):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class TaggingHead(nn.Module):
    def __init__(self, layers: int, hidden: int, width: int, inner: int, heads: int = HEADS):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not a multiple of {heads} heads")
        self.encoder = _Encoder([HeadLayer(hidden, width, inner, heads) for _ in range(layers)])

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        h = queries
        for layer in self.encoder.layer:
            h = layer(h, memory)
        return h


def head_shape(weights: dict[str, torch.Tensor], prefix: str) -> dict:
    """TaggingHead arguments from the shapes of its weights (keys starting with `prefix`)."""
    layers = 0
    while f"{prefix}encoder.layer.{layers}.crossattention.self.query.weight" in weights:
        layers += 1
    first = f"{prefix}encoder.layer.0."
    return dict(layers=layers, hidden=weights[first + "crossattention.self.query.weight"].shape[0],
                width=weights[first + "crossattention.self.key.weight"].shape[1],
                inner=weights[first + "intermediate.dense.weight"].shape[0])

"""A Llama-like decoder stack from hand-written blocks (no transformers): hand-written RMSNorm
(float32 inside, as Hugging Face writes it), q/k/v/o attention, gate/up/down MLP, a final norm and
an LM head that may be tied to the embedding; and a writer of Hugging Face sharded safetensors
checkpoints. Used by the sharded-checkpoint tests and ``benchmarks/norm_affine_shards.py``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(d), RMSNorm(d)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate_proj, self.up_proj = nn.Linear(d, ff, bias=False), nn.Linear(d, ff, bias=False)
        self.down_proj = nn.Linear(ff, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        hd = d // self.heads
        h = self.input_layernorm(x)
        projs = (self.q_proj, self.k_proj, self.v_proj)
        q, k, v = (p(h).view(b, n, self.heads, hd).transpose(1, 2) for p in projs)
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        x = x + self.o_proj((w @ v).transpose(1, 2).reshape(b, n, d))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(torch.nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


class LlamaLike(nn.Module):
    def __init__(self, vocab: int = 64, d: int = 32, heads: int = 4, ff: int = 48, layers: int = 2,
                 tied: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, heads, ff) for _ in range(layers))
        self.norm = RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(self.norm(h))


def realistic_(model: nn.Module, seed: int) -> nn.Module:
    """Random trained-looking weights: Linear/embedding ~ N(0, 1/sqrt(fan_in)) with a few large
    input channels, norm scales U(0.3, 2.0) (never 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.copy_(torch.rand(p.shape, generator=gen) * 1.7 + 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    return model


def save_sharded(state: dict[str, torch.Tensor], folder: Path, shard_bytes: int) -> list[str]:
    """``state`` as Hugging Face writes it: shards of about ``shard_bytes`` with an index (one
    ``model.safetensors`` when it all fits). Returns the shard names."""
    folder.mkdir(parents=True, exist_ok=True)
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        if groups[-1] and size + t.numel() * t.element_size() > shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t.contiguous()
        size += t.numel() * t.element_size()
    if len(groups) == 1:
        save_file(groups[0], folder / "model.safetensors", metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map = {}
    for name, group in zip(names, groups, strict=True):
        save_file(group, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names

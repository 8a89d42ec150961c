"""Small hand-written transformer blocks for the norm-affine tests: each reproduces one pattern of
Hugging Face models (no transformers needed) with realistic norm parameters (scale around 1 but
never 1, a non-zero shift), so a fold that forgets a part of the affine map shows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

D, HEADS = 16, 4
HD = D // HEADS


def _scale(d: int, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(d, generator=gen) * 1.5 + 0.25  # in [0.25, 1.75]: no zero, never all 1


def layer_norm(d: int, seed: int) -> nn.LayerNorm:
    gen = torch.Generator().manual_seed(seed)
    ln = nn.LayerNorm(d)
    with torch.no_grad():
        ln.weight.copy_(_scale(d, gen))
        ln.bias.copy_(torch.randn(d, generator=gen) * 0.3)
    return ln


class HFRMSNorm(nn.Module):
    """As Hugging Face writes it: float32 inside, ``pow/mean/rsqrt/mul``, cast back; ``offset``:
    Gemma's ``x * (1 + w)`` form (then ``w`` is stored minus one)."""

    def __init__(self, d: int, seed: int, offset: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        w = _scale(d, torch.Generator().manual_seed(seed))
        self.weight = nn.Parameter(w - 1 if offset else w)
        self.offset, self.eps = offset, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * (1.0 + self.weight.float())).to(dtype)
        return self.weight * h.to(dtype)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(B, L, D)`` each -> ``(B, L, D)``, ``HEADS`` heads."""
    b, n, _ = q.shape
    q, k, v = (t.view(b, n, HEADS, HD).transpose(1, 2) for t in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(HD), dim=-1)
    return (w @ v).transpose(1, 2).reshape(b, n, D)


class PreLNAttention(nn.Module):
    """``x + o(attn(q(ln x), k(ln x), v(ln x)))``: one norm, three consumers with biases."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.ln = layer_norm(D, 2)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        return x + self.o(_attention(self.q(h), self.k(h), self.v(h)))


class RMSGatedMLP(nn.Module):
    """Llama's MLP: ``x + down(silu(gate(n)) * up(n))``, hand-written RMSNorm, no biases."""

    def __init__(self, offset: bool = False) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.norm = HFRMSNorm(D, 4, offset=offset)
        self.gate, self.up = nn.Linear(D, 2 * D, bias=False), nn.Linear(D, 2 * D, bias=False)
        self.down = nn.Linear(2 * D, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class PostLN(nn.Module):
    """BERT/OPT post-LN: ``h = ln(x + f(x)); h + fc(h)``: the norm output feeds the residual."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.f, self.fc = nn.Linear(D, D), nn.Linear(D, D)
        self.ln = layer_norm(D, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x + self.f(x))
        return h + self.fc(h)


class LNIntoBiasFree(nn.Module):
    """A LayerNorm (with its shift) into a Linear without bias (GPT-NeoX/OPT heads)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.ln = layer_norm(D, 8)
        self.proj = nn.Linear(D, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.ln(x))


class FusedQKV(nn.Module):
    """Phi-3: one ``qkv`` Linear, split into heads after it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(9)
        self.ln = layer_norm(D, 10)
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.ln(x)).split(D, dim=-1)
        return x + self.o(_attention(q, k, v))


class Conv1D(nn.Module):
    """GPT-2's Conv1D: an ``(in, out)`` weight, ``addmm`` over the flattened tokens."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(*x.shape[:-1], self.nf)


class GPT2MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.ln_2 = layer_norm(D, 12)
        self.c_fc, self.c_proj = Conv1D(D, 4 * D), Conv1D(4 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class TiedHead(nn.Module):
    """A final norm into an LM head tied to the input embedding."""

    def __init__(self, vocab: int = 24) -> None:
        super().__init__()
        torch.manual_seed(13)
        self.embed = nn.Embedding(vocab, D)
        self.mix = nn.Linear(D, D)
        self.norm = HFRMSNorm(D, 14)
        self.head = nn.Linear(D, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.mix(h)
        return self.head(self.norm(h))


class NormAsOutput(nn.Module):
    """T5's final encoder norm: returned by the model as well as projected."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(15)
        self.norm = HFRMSNorm(D, 16)
        self.proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(x)
        return h, self.proj(h)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class QKNorm(nn.Module):
    """Qwen3/OLMo2 per-head qk-norm: ``rope=True`` rotates after it (kept), else the heads are
    merged straight into ``o`` (the per-head scale repeats over heads: folds)."""

    def __init__(self, rope: bool) -> None:
        super().__init__()
        torch.manual_seed(17)
        self.rope = rope
        self.q = nn.Linear(D, D)
        self.q_norm = HFRMSNorm(HD, 18)
        self.o = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_norm(self.q(x).view(b, n, HEADS, HD))
        if self.rope:
            pos = torch.arange(n, dtype=x.dtype, device=x.device)
            inv = 1.0 / (10000 ** (torch.arange(0, HD, 2, dtype=x.dtype, device=x.device) / HD))
            emb = torch.cat([pos[:, None] * inv[None, :]] * 2, dim=-1)[None, :, None, :]
            q = q * emb.cos() + _rotate_half(q) * emb.sin()
        return x + self.o(q.reshape(b, n, D))


class DenseMoE(nn.Module):
    """A router Linear and a batch of experts as 3-d parameters (``bmm`` over every expert, weighted
    by the router): one norm, two kinds of consumer. ``transposed``: experts stored ``(E, out, in)``
    and read as ``w.transpose(1, 2)``."""

    def __init__(self, experts: int = 3, transposed: bool = False, repeat: bool = False) -> None:
        super().__init__()
        torch.manual_seed(19)
        self.norm = HFRMSNorm(D, 20)
        self.router = nn.Linear(D, experts, bias=False)
        shape = (experts, 2 * D, D) if transposed else (experts, D, 2 * D)
        self.w_in = nn.Parameter(torch.randn(*shape) * 0.2)
        self.w_out = nn.Parameter(torch.randn(experts, 2 * D, D) * 0.2)
        self.transposed, self.repeat = transposed, repeat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, n, _ = h.shape
        e = self.w_out.shape[0]
        if self.repeat:  # Llama 4 writes the copies for every expert with ``repeat``
            tokens = h.reshape(b * n, D).repeat(e, 1).reshape(e, b * n, D)
        else:
            tokens = h.reshape(1, b * n, D).expand(e, b * n, D)
        w_in = self.w_in.transpose(1, 2) if self.transposed else self.w_in
        y = torch.bmm(F.silu(torch.bmm(tokens, w_in)), self.w_out)  # (E, T, D)
        probs = torch.softmax(self.router(h).reshape(b * n, e), dim=-1)
        return x + (y * probs.t()[..., None]).sum(0).reshape(b, n, D)


@torch.library.custom_op("normfold_blocks::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``x[s:e] @ w[g]`` for the rows ``s:e`` of group ``g`` (``offs``: cumulative row counts), as
    ``torch._grouped_mm`` and Hugging Face's ``transformers::grouped_mm_fallback`` compute it."""
    out, start = [], 0
    for g, end in enumerate(offs.tolist()):
        out.append(x[start:end] @ w[g])
        start = end
    return torch.cat(out)


@grouped_mm.register_fake
def _(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("normfold_blocks::first_expert", mutates_args=())
def first_expert(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Same schema as :func:`grouped_mm`, but ``sign(x) @ w[0]`` for every row: not a grouped matmul."""
    return torch.sign(x) @ w[0]


@first_expert.register_fake
def _(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[-1])


class DispatchedMoE(nn.Module):
    """Hugging Face's MoE dispatch (transformers 5): a router Linear whose probabilities take the
    hidden state's dtype (``type_as``), top-2 experts, the tokens gathered by expert (``h[token]``),
    every expert in one grouped-matmul custom op over ``(E, out, in)`` weights read transposed, the
    results weighted and added back per token. ``op``: the grouped matmul (or an op that is none)."""

    def __init__(self, experts: int = 3, op: object = None) -> None:
        super().__init__()
        torch.manual_seed(29)
        self.norm = HFRMSNorm(D, 30)
        self.router = nn.Linear(D, experts, bias=False)
        self.gate_up = nn.Parameter(torch.randn(experts, 2 * D, D) * 0.2)
        self.down = nn.Parameter(torch.randn(experts, D, D) * 0.2)
        self.op = op or torch.ops.normfold_blocks.grouped_mm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.norm(x).reshape(-1, D)
        probs = torch.softmax(self.router(h).float(), dim=-1).type_as(h)
        weights, chosen = probs.topk(2)
        experts, order = chosen.reshape(-1).sort()
        token = order // 2
        e = self.gate_up.shape[0]
        offs = torch.cumsum(torch.histc(experts.float(), bins=e, min=0, max=e - 1), 0, dtype=torch.int32)
        up = self.op(h[token], self.gate_up.transpose(-2, -1), offs)
        gate, value = up.chunk(2, dim=-1)
        y = self.op(F.silu(gate) * value, self.down.transpose(-2, -1), offs)
        y = y * weights.reshape(-1)[order, None]
        return x + torch.zeros_like(h).index_add(0, token, y).reshape(b, n, D)


class CastRouter(nn.Module):
    """DeepSeek-V3's router: ``F.linear(h.type(float32), self.weight.type(float32))`` (the weight read
    through a cast), next to a plain Linear on the same norm."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(31)
        self.norm = HFRMSNorm(D, 32)
        self.weight = nn.Parameter(torch.randn(4, D) * 0.3)
        self.up = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        logits = F.linear(h.type(torch.float32), self.weight.type(torch.float32))
        return self.up(h) * torch.sigmoid(logits).sum(-1, keepdim=True)


class TransposedHead(nn.Module):
    """A head written as ``h @ W.T`` with ``W`` an ``(out, in)`` parameter, after a LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(23)
        self.ln = layer_norm(D, 24)
        self.weight = nn.Parameter(torch.randn(5, D) * 0.3)
        self.bias = nn.Parameter(torch.randn(5) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x) @ self.weight.T + self.bias


class MiniLlama(nn.Module):
    """Two Llama decoder layers (input norm -> q/k/v with rotary after the projections; post-attention
    norm -> gate/up), a final norm and an LM head, tied to the embedding or not."""

    def __init__(self, tied: bool, vocab: int = 32, layers: int = 2) -> None:
        super().__init__()
        torch.manual_seed(25)
        self.embed = nn.Embedding(vocab, D)
        self.layers = nn.ModuleList(_LlamaLayer(26 + i) for i in range(layers))
        self.norm = HFRMSNorm(D, 40)
        self.lm_head = nn.Linear(D, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(self.norm(h))


class _LlamaLayer(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self.input_layernorm = HFRMSNorm(D, seed)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(D, D, bias=False) for _ in range(4))
        self.post_attention_layernorm = HFRMSNorm(D, seed + 100)
        self.mlp = _LlamaMLP()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.input_layernorm(h)
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, HEADS, HD) for p in (self.q_proj, self.k_proj, self.v_proj))
        pos = torch.arange(n, dtype=x.dtype, device=x.device)
        inv = 1.0 / (10000 ** (torch.arange(0, HD, 2, dtype=x.dtype, device=x.device) / HD))
        emb = torch.cat([pos[:, None] * inv[None, :]] * 2, dim=-1)[None, :, None, :]
        q, k = (t * emb.cos() + _rotate_half(t) * emb.sin() for t in (q, k))
        att = _attention(q.reshape(b, n, D), k.reshape(b, n, D), v.reshape(b, n, D))
        h = h + self.o_proj(att)
        return h + self.mlp(self.post_attention_layernorm(h))


class _LlamaMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(D, 2 * D, bias=False), nn.Linear(D, 2 * D, bias=False)
        self.down_proj = nn.Linear(2 * D, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class BertHead(nn.Module):
    """BERT's MLM head: transform -> LayerNorm -> decoder tied to the word embeddings, whose bias
    is also registered as ``predictions_bias`` (``cls.predictions.bias`` in Hugging Face)."""

    def __init__(self, vocab: int = 24) -> None:
        super().__init__()
        torch.manual_seed(41)
        self.word_embeddings = nn.Embedding(vocab, D)
        self.transform = nn.Linear(D, D)
        self.LayerNorm = layer_norm(D, 42)
        self.decoder = nn.Linear(D, vocab)
        self.decoder.weight = self.word_embeddings.weight
        self.predictions_bias = self.decoder.bias

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.word_embeddings(ids)
        return self.decoder(self.LayerNorm(F.gelu(self.transform(h))))


class ParallelBlock(nn.Module):
    """GPT-J / Falcon parallel attention: one norm feeds attention and the MLP at once."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(43)
        self.ln = layer_norm(D, 44)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D, bias=False) for _ in range(4))
        self.fc_in, self.fc_out = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        return x + self.o(_attention(self.q(h), self.k(h), self.v(h))) + self.fc_out(F.gelu(self.fc_in(h)))


class CohereLayerNorm(nn.Module):
    """Cohere's hand-written LayerNorm: ``(h - mean)`` computed twice, float32 inside, no shift."""

    def __init__(self, d: int, seed: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(_scale(d, torch.Generator().manual_seed(seed)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        mean = h.mean(-1, keepdim=True)
        variance = (h - mean).pow(2).mean(-1, keepdim=True)
        h = (h - mean) * torch.rsqrt(variance + self.eps)
        return (self.weight.to(torch.float32) * h).to(dtype)

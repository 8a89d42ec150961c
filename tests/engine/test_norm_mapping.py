"""The norm -> consumers map in other tools' formats (:mod:`normfold.engine.norm_affine.mapping`),
on small hand-written blocks: each format's fields as the tool reads them, names that resolve to
the model's own modules, and only the norms that fold."""

from __future__ import annotations

import re

import pytest
import torch
from llama_like import LlamaLike, realistic_
from norm_blocks import D, FusedQKV

import normfold
from normfold.errors import UsageError

IDS = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
LLAMA = [
    ("layers.0.input_layernorm", ["layers.0.q_proj", "layers.0.k_proj", "layers.0.v_proj"]),
    ("layers.0.post_attention_layernorm", ["layers.0.gate_proj", "layers.0.up_proj"]),
    ("norm", ["lm_head"]),
]


@pytest.fixture(scope="module")
def llama() -> normfold.NormAffineResult:
    return normfold.fold_norm_affine(realistic_(LlamaLike(layers=1), 0).eval(), IDS)


def test_llm_compressor_norm_mapping_fields(llama: normfold.NormAffineResult) -> None:
    assert llama.mapping("llm-compressor") == [{"norm": n, "linears": ls} for n, ls in LLAMA]
    assert llama.mapping() == llama.norm_mappings()  # the default format, as before


def test_aimet_rmsnorm_linear_pairs_resolve_to_the_models_modules(llama: normfold.NormAffineResult) -> None:
    pairs = llama.mapping("aimet")
    assert pairs == LLAMA and all(isinstance(p, tuple) for p in pairs)
    model = llama.model
    resolved = [(model.get_submodule(n), [model.get_submodule(x) for x in xs]) for n, xs in pairs]
    assert all(isinstance(x, torch.nn.Linear) for _, xs in resolved for x in xs)
    assert resolved[0][0] is model.layers[0].input_layernorm


def test_autoround_awq_mappings_match_exactly_one_module_each(llama: normfold.NormAffineResult) -> None:
    entries = llama.mapping("autoround")
    assert [set(e) for e in entries] == [{"smooth_layer", "balance_layers"}] * 3
    names = [n for n, _ in llama.model.named_modules()]
    for entry, (norm, linears) in zip(entries, LLAMA, strict=True):
        # AutoRound matches with re.search against module names: each pattern hits one name only
        assert [n for n in names if re.search(entry["smooth_layer"], n)] == [norm]
        hits = [[n for n in names if re.search(p, n)] for p in entry["balance_layers"]]
        assert hits == [[x] for x in linears]
    assert entries[2] == {"smooth_layer": "^norm$", "balance_layers": ["^lm_head$"]}


def test_a_kept_norm_is_not_mapped_and_a_fused_qkv_is_one_linear() -> None:
    tied = normfold.fold_norm_affine(realistic_(LlamaLike(layers=1, tied=True), 0).eval(), IDS)
    assert [n for n, _ in tied.mapping("aimet")] == [LLAMA[0][0], LLAMA[1][0]]  # the tied head's norm stays
    fused = normfold.fold_norm_affine(FusedQKV().eval(), torch.randn(2, 5, D))
    assert fused.mapping("aimet") == [("ln", ["qkv"])]


def test_an_unknown_format_is_refused(llama: normfold.NormAffineResult) -> None:
    with pytest.raises(UsageError, match="unknown mapping format 'awq'; use one of llm-compressor, aimet"):
        llama.mapping("awq")

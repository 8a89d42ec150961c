"""``normfold.fold_norm_affine``: LayerNorm / RMSNorm / GroupNorm scale and shift into the Linear layers
they feed (issue 22), on small hand-written blocks of each pattern (:mod:`norm_blocks`), no transformers.

Every fold is judged against the *original* module by the parity rule, with the original's captured
graph widened to float64 as the exact reference; folded values are checked against the float64 math
cast once; every refusal asserts its exact code and reason.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from norm_blocks import (
    GPT2MLP,
    HD,
    HEADS,
    BertHead,
    CastRouter,
    CohereLayerNorm,
    D,
    DenseMoE,
    DispatchedMoE,
    FusedQKV,
    HFRMSNorm,
    LNIntoBiasFree,
    MiniLlama,
    NormAsOutput,
    ParallelBlock,
    PostLN,
    PreLNAttention,
    QKNorm,
    RMSGatedMLP,
    TiedHead,
    TransposedHead,
    layer_norm,
)
from torch import nn

import normfold
from normfold.check.parity_rule import ParityRule
from normfold.check.widen import widened
from normfold.check.widened_parity import widened_parity
from normfold.engine.capture import CaptureOptions, capture
from normfold.engine.norm_affine.apply import apply_plan

X = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(0))


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def _fold(model: nn.Module, inputs: torch.Tensor = X, **kw: object) -> normfold.NormAffineResult:
    before = copy.deepcopy(model.state_dict())
    result = normfold.fold_norm_affine(model, inputs, **kw)
    assert result.parity is not None and result.parity.passed, result.parity.failures()
    assert result.replan_folds == 0
    if not kw.get("inplace"):
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # caller untouched
    return result


def _only_kept(result: normfold.NormAffineResult) -> normfold.NormKept:
    assert result.folded == [] and len(result.kept) == 1
    return result.kept[0]


# --- folds --------------------------------------------------------------------------------------


def test_pre_ln_attention_scale_and_shift_move_into_q_k_v() -> None:
    model = PreLNAttention().eval()
    result = _fold(model)
    (f,) = result.folded
    assert (f.norm, f.kind, f.pattern, f.norm_type) == ("ln", "layer_norm", "layer_norm", "LayerNorm")
    assert f.into == ("q.weight", "k.weight", "v.weight") and f.code is None and result.kept == []
    g, b = _wide(model.ln.weight), _wide(model.ln.bias)
    for name in ("q", "k", "v"):
        old, new = getattr(model, name), getattr(result.model, name)
        assert torch.equal(new.weight, (_wide(old.weight) * g).float())
        assert torch.equal(new.bias, (_wide(old.bias) + _wide(old.weight) @ b).float())
    assert torch.equal(result.model.ln.weight, torch.ones(D))
    assert torch.equal(result.model.ln.bias, torch.zeros(D))
    assert isinstance(result.model.ln, nn.LayerNorm)  # class, paths and keys stay
    assert result.model.state_dict().keys() == model.state_dict().keys()
    assert normfold.verify(model, result.model, X).passed  # the library's own judge agrees
    report = json.loads(json.dumps(result.to_dict()))
    assert report["folded"][0]["into"] == ["q.weight", "k.weight", "v.weight"] and report["parity"]["passed"]


def test_hand_written_rmsnorm_with_casts_into_gate_and_up() -> None:
    model = RMSGatedMLP().eval()
    result = _fold(model)
    (f,) = result.folded
    assert (f.norm, f.kind, f.pattern, f.norm_type) == ("norm", "rms_norm", "hand-written", "HFRMSNorm")
    assert f.into == ("gate.weight", "up.weight")
    g = _wide(model.norm.weight)
    assert torch.equal(result.model.up.weight, (_wide(model.up.weight) * g).float())
    assert torch.equal(result.model.norm.weight, torch.ones(D))
    assert torch.equal(result.model.down.weight, model.down.weight)  # not a consumer of the norm


def test_gemma_one_plus_w_norm_gets_the_neutral_weight_zero() -> None:
    model = RMSGatedMLP(offset=True).eval()
    assert bool((model.norm.weight < 0).any())  # stored as w - 1: a fold that forgets the 1 shows
    result = _fold(model)
    assert result.folded[0].into == ("gate.weight", "up.weight")
    assert torch.equal(result.model.norm.weight, torch.zeros(D))
    g = 1.0 + _wide(model.norm.weight)
    assert torch.equal(result.model.gate.weight, (_wide(model.gate.weight) * g).float())


def test_fused_qkv_linear_absorbs_the_norm() -> None:
    model = FusedQKV().eval()
    result = _fold(model)
    assert [(f.norm, f.into) for f in result.folded] == [("ln", ("qkv.weight",))]
    shift = _wide(model.qkv.weight) @ _wide(model.ln.bias)
    assert torch.equal(result.model.qkv.bias, (_wide(model.qkv.bias) + shift).float())


def test_gpt2_conv1d_in_out_weight_scales_its_rows() -> None:
    model = GPT2MLP().eval()
    result = _fold(model)
    assert [(f.norm, f.into) for f in result.folded] == [("ln_2", ("c_fc.weight",))]
    w, g, b = _wide(model.c_fc.weight), _wide(model.ln_2.weight), _wide(model.ln_2.bias)
    assert torch.equal(result.model.c_fc.weight, (w * g[:, None]).float())  # (in, out): rows
    assert torch.equal(result.model.c_fc.bias, (_wide(model.c_fc.bias) + b @ w).float())


def test_per_head_norm_merged_into_a_linear_repeats_its_scale_over_heads() -> None:
    model = QKNorm(rope=False).eval()
    result = _fold(model)
    assert [(f.norm, f.into) for f in result.folded] == [("q_norm", ("o.weight",))]
    g = _wide(model.q_norm.weight).repeat(HEADS)  # o's input j reads head channel j % HD
    assert torch.equal(result.model.o.weight, (_wide(model.o.weight) * g).float())
    assert g.shape == (HEADS * HD,)


@pytest.mark.parametrize("transposed", [False, True])
def test_moe_router_and_batched_experts_take_one_scale(transposed: bool) -> None:
    model = DenseMoE(transposed=transposed).eval()
    result = _fold(model)
    assert [(f.norm, f.into) for f in result.folded] == [("norm", ("w_in", "router.weight"))]
    g = _wide(model.norm.weight)
    scale = g[None, None, :] if transposed else g[None, :, None]  # the experts' input axis
    assert torch.equal(result.model.w_in, (_wide(model.w_in) * scale).float())
    assert torch.equal(result.model.w_out, model.w_out)


def test_llama4_repeat_of_the_tokens_for_every_expert_is_followed() -> None:
    model = DenseMoE(repeat=True).eval()
    result = _fold(model)
    assert [(f.norm, f.into) for f in result.folded] == [("norm", ("w_in", "router.weight"))]
    g = _wide(model.norm.weight)
    assert torch.equal(result.model.w_in, (_wide(model.w_in) * g[None, :, None]).float())


def test_dispatched_moe_tokens_gathered_into_a_grouped_matmul_custom_op() -> None:
    """The dispatch of transformers 5 MoE blocks: a row gather ``h[token]`` and a custom op told to be
    a grouped matmul by what it computes (issue 22's benchmark: Mixtral, Qwen-MoE, gpt-oss, OLMoE kept
    their norm before the experts); the router's ``type_as(h)`` reads only h's dtype."""
    from normfold.engine.norm_affine.grouped_mm import is_grouped_mm

    assert is_grouped_mm(torch.ops.normfold_blocks.grouped_mm.default)
    assert not is_grouped_mm(torch.ops.normfold_blocks.first_expert.default)
    assert not is_grouped_mm(torch.ops.aten.addmm.default) and not is_grouped_mm(torch.ops.aten.mm.default)
    model = DispatchedMoE().eval()
    result = _fold(model)
    assert [(f.norm, f.into) for f in result.folded] == [("norm", ("router.weight", "gate_up"))]
    g = _wide(model.norm.weight)
    assert torch.equal(result.model.gate_up, (_wide(model.gate_up) * g[None, None, :]).float())  # E, out, in
    assert torch.equal(result.model.router.weight, (_wide(model.router.weight) * g).float())
    assert torch.equal(result.model.down, model.down) and bool((result.model.norm.weight == 1).all())


def test_a_custom_op_that_is_no_grouped_matmul_keeps_the_norm() -> None:
    model = DispatchedMoE(op=torch.ops.normfold_blocks.first_expert).eval()
    kept = _only_kept(_fold(model))
    assert (kept.norm, kept.code) == ("norm", "nonlinear_consumer")
    assert kept.reason.startswith("the output of the norm at norm (mul) feeds ")
    assert "first_expert" in kept.reason and kept.reason.endswith("not a Linear over its normalized axis")


def test_a_linear_reading_its_weight_through_a_cast_takes_the_scale() -> None:
    """DeepSeek-V3's router reads ``self.weight.type(float32)``: kept as ``weight_not_parameter``
    before (issue 22's benchmark); the parameter behind the cast is scaled."""
    model = CastRouter().eval()
    program = torch.export.export(model, (X,)).graph_module.graph
    assert any(n.target is torch.ops.aten._to_copy.default or n.target is torch.ops.aten.to.dtype
               for n in program.nodes if n.args and getattr(n.args[0], "name", "") == "p_weight")  # fmt: skip
    result = _fold(model)
    assert [(f.norm, f.into) for f in result.folded] == [("norm", ("weight", "up.weight"))]
    g = _wide(model.norm.weight)
    assert torch.equal(result.model.weight, (_wide(model.weight) * g).float())


def test_x_at_w_transposed_head_with_its_bias() -> None:
    model = TransposedHead().eval()
    result = _fold(model)
    assert [(f.norm, f.into) for f in result.folded] == [("ln", ("weight",))]
    w, b = _wide(model.weight), _wide(model.ln.bias)
    assert torch.equal(result.model.weight, (w * _wide(model.ln.weight)).float())
    assert torch.equal(result.model.bias, (_wide(model.bias) + w @ b).float())


class _Builtins(nn.Module):
    """``aten.rms_norm`` (nn.RMSNorm), GroupNorm (one group, and four: the affine map is per channel
    either way) over ``(N, C, L)`` moved to ``(N, L, C)``, a hand-written LayerNorm with ``var``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(21)
        self.rms, self.gn, self.hand = nn.RMSNorm(D), nn.GroupNorm(1, D), layer_norm(D, 22)
        self.gn4 = nn.GroupNorm(4, D)
        with torch.no_grad():
            self.rms.weight.uniform_(0.3, 1.7)
            for gn in (self.gn, self.gn4):
                gn.weight.uniform_(0.3, 1.7)
                gn.bias.normal_(0, 0.3)
        self.a, self.b, self.c, self.d = (nn.Linear(D, 4) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gn(x.transpose(1, 2)).transpose(1, 2)
        mu, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
        h = (x - mu) * torch.rsqrt(var + 1e-5) * self.hand.weight + self.hand.bias
        g4 = self.gn4(x.transpose(1, 2)).transpose(1, 2)
        return self.a(self.rms(x)) + self.b(g) + self.c(h) + self.d(g4)


def test_builtin_rms_norm_group_norm_and_hand_written_layer_norm() -> None:
    model = _Builtins().eval()
    result = _fold(model)
    found = {(f.norm, f.kind, f.pattern, f.into) for f in result.folded}
    assert found == {
        ("rms", "rms_norm", "rms_norm", ("a.weight",)),
        ("gn", "group_norm", "group_norm", ("b.weight",)),
        ("forward:mean", "layer_norm", "hand-written", ("c.weight",)),
        ("gn4", "group_norm", "group_norm", ("d.weight",)),
    }
    assert torch.equal(result.model.gn.bias, torch.zeros(D))
    assert torch.equal(result.model.hand.weight, torch.ones(D))


# --- the shift without a bias -------------------------------------------------------------------


def test_ln_shift_stays_in_the_norm_when_the_linear_has_no_bias() -> None:
    model = LNIntoBiasFree().eval()
    result = _fold(model)
    (f,) = result.folded
    assert f.into == ("proj.weight",) and f.new_biases == () and f.code == "new_bias_needed"
    assert f.reason == ("proj has no bias to take the shift of ln (pass new_biases=True to give nn.Linear "
                        "layers one): the shift stays in the norm as beta / gamma")  # fmt: skip
    g, b = _wide(model.ln.weight), _wide(model.ln.bias)
    assert torch.equal(result.model.ln.bias, (b / g).float())
    assert torch.equal(result.model.ln.weight, torch.ones(D))
    assert result.model.proj.bias is None and result.model.state_dict().keys() == model.state_dict().keys()


def test_new_biases_gives_the_linear_the_shift() -> None:
    model = LNIntoBiasFree().eval()
    result = _fold(model, new_biases=True)
    (f,) = result.folded
    assert f.new_biases == ("proj.bias",) and f.code is None
    expected = _wide(model.proj.weight) @ _wide(model.ln.bias)
    assert torch.equal(result.model.proj.bias, expected.float())
    assert torch.equal(result.model.ln.bias, torch.zeros(D))
    assert set(result.model.state_dict()) - set(model.state_dict()) == {"proj.bias"}


# --- refusals -----------------------------------------------------------------------------------


def test_post_ln_norm_feeding_the_residual_is_kept() -> None:
    k = _only_kept(_fold(PostLN().eval()))
    assert (k.norm, k.code) == ("ln", "residual_user")
    assert k.reason == ("the output of the norm at ln (layer_norm) is also added to another tensor (a "
                        "residual: add (forward)): a Linear alone cannot absorb its scale")  # fmt: skip


def test_tied_lm_head_is_refused() -> None:
    model = TiedHead().eval()
    k = _only_kept(_fold(model, torch.randint(0, 24, (2, 5), generator=torch.Generator().manual_seed(1))))
    assert (k.norm, k.code) == ("norm", "tied_weight")
    assert k.reason == ("the weight head.weight of head (linear) is also read by embed (embedding) (a tied "
                        "or shared weight): scaling it would change that reader too (untie=True gives head "
                        "its own copy)")  # fmt: skip


def _llama_folds(result: normfold.NormAffineResult) -> list[tuple[str, tuple[str, ...]]]:
    return [(f.norm, f.into) for f in result.folded]


_LLAMA_LAYERS = [
    (f"layers.{i}.{norm}", tuple(f"layers.{i}.{p}.weight" for p in into))
    for i in range(2)
    for norm, into in (("input_layernorm", ("q_proj", "k_proj", "v_proj")),
                       ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))
]  # fmt: skip
IDS = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(2))


def test_mini_llama_every_norm_folds_and_a_tied_head_waits_for_untie() -> None:
    untied = _fold(MiniLlama(tied=False).eval(), IDS)
    assert _llama_folds(untied) == [*_LLAMA_LAYERS, ("norm", ("lm_head.weight",))] and untied.kept == []
    model = MiniLlama(tied=True).eval()
    kept = _fold(model, IDS)
    assert _llama_folds(kept) == _LLAMA_LAYERS
    assert [(k.norm, k.code) for k in kept.kept] == [("norm", "tied_weight")]
    model.config = type("Config", (), {"tie_word_embeddings": True})()  # as a Hugging Face model has
    result = _fold(model, IDS, untie=True)
    assert _llama_folds(result) == [*_LLAMA_LAYERS, ("norm", ("lm_head.weight",))]
    assert result.folded[-1].untied == ("lm_head.weight",) and result.kept == []
    folded = result.model
    assert folded.lm_head.weight is not folded.embed.weight
    assert torch.equal(folded.embed.weight, model.embed.weight)  # the embedding keeps the unscaled original
    g = _wide(model.norm.weight)
    assert torch.equal(folded.lm_head.weight, (_wide(model.embed.weight) * g).float())
    assert folded.config.tie_word_embeddings is False and model.config.tie_word_embeddings is True
    assert result.notes == ["untied lm_head.weight: config.tie_word_embeddings set to False"]
    assert folded.state_dict().keys() == model.state_dict().keys()
    assert untied.norm_mappings()[:2] == [
        {"norm": "layers.0.input_layernorm",
         "linears": ["layers.0.q_proj", "layers.0.k_proj", "layers.0.v_proj"]},
        {"norm": "layers.0.post_attention_layernorm",
         "linears": ["layers.0.mlp.gate_proj", "layers.0.mlp.up_proj"]},
    ]  # fmt: skip
    assert untied.norm_mappings()[-1] == {"norm": "norm", "linears": ["lm_head"]}


def test_bert_head_untied_weight_and_a_bias_under_two_names() -> None:
    """The decoder weight is the embedding's (another op reads it: copied); its bias is also
    ``predictions_bias``, read by no other op: changed in place, so both names hold the fold."""
    model = BertHead().eval()
    ids = IDS.remainder(24)
    assert [k.code for k in _fold(model, ids).kept] == ["tied_weight"]
    result = _fold(model, ids, untie=True)
    (f,) = result.folded
    assert (f.norm, f.into, f.untied) == ("LayerNorm", ("decoder.weight",), ("decoder.weight",))
    folded = result.model
    shift = _wide(model.word_embeddings.weight) @ _wide(model.LayerNorm.bias)
    assert folded.decoder.bias is folded.predictions_bias  # still one tensor under both names
    assert torch.equal(folded.predictions_bias, (_wide(model.decoder.bias) + shift).float())
    assert torch.equal(folded.word_embeddings.weight, model.word_embeddings.weight)


def test_untying_a_hugging_face_config_gives_a_bias_under_two_names_a_copy_per_name() -> None:
    """With ``tie_word_embeddings`` False, ``save_pretrained`` writes a tensor shared under two names
    under one, and ``from_pretrained`` ties neither back (issue 22's benchmark: BERT's reloaded
    ``decoder.bias`` was left at its init, logits off by 0.07): each name gets its own storage."""
    model = BertHead().eval()
    model.config = type("Config", (), {"tie_word_embeddings": True})()
    result = _fold(model, IDS.remainder(24), untie=True)
    folded = result.model
    shift = _wide(model.word_embeddings.weight) @ _wide(model.LayerNorm.bias)
    want = (_wide(model.decoder.bias) + shift).float()
    assert torch.equal(folded.predictions_bias, want) and torch.equal(folded.decoder.bias, want)
    assert folded.decoder.bias.data_ptr() != folded.predictions_bias.data_ptr()  # both names are saved
    assert folded.decoder.bias is folded.decoder._parameters["bias"]  # the layer reads its own
    assert result.notes[1] == ("decoder.bias (was predictions_bias): each a copy of its own now (a tensor "
                               "shared under several names is saved under one, and an untied config no "
                               "longer ties the others back on load)")  # fmt: skip
    assert model.decoder.bias is model.predictions_bias  # the caller's model untouched


def test_parallel_attention_and_mlp_take_one_scale() -> None:
    model = ParallelBlock().eval()
    (f,) = _fold(model).folded
    assert f.into == ("q.weight", "k.weight", "v.weight", "fc_in.weight") and f.code == "new_bias_needed"
    g = _wide(model.ln.weight)
    assert torch.equal(_fold(model).model.fc_in.weight, (_wide(model.fc_in.weight) * g).float())
    both = _fold(model, new_biases=True).folded[0]
    assert both.code is None and both.new_biases == ("q.bias", "k.bias", "v.bias")


def test_norm_returned_by_the_model_is_kept() -> None:
    k = _only_kept(_fold(NormAsOutput().eval()))
    assert (k.norm, k.code) == ("norm", "model_output")
    assert k.reason == ("the output of the norm at norm (mul) is returned by the model: its scale and shift "
                        "must stay")


def test_qk_norm_before_rotary_is_kept() -> None:
    k = _only_kept(_fold(QKNorm(rope=True).eval()))
    assert (k.norm, k.code) == ("q_norm", "rope_after_norm")
    assert k.reason == ("the output of the norm at q_norm (mul) is rotated before any Linear (a rotary "
                        "embedding: mul (forward), neg (forward), cat (forward), add (forward))")  # fmt: skip


class _Gated(nn.Module):
    """A norm output times a gate before its Linear: ``out(norm(x) * silu(gate(x)))`` (Qwen3-Next's
    gated norm), ``out(h * sigmoid(g(h)))`` (a gate computed from the norm output itself, as a router
    weight), or ``out(h * h)`` (the scale squared: no fold). ``norm``: "rms" or "ln" (with a shift)."""

    def __init__(self, form: str, norm: str = "rms") -> None:
        super().__init__()
        torch.manual_seed(50)
        self.form = form
        self.norm = HFRMSNorm(D, 51) if norm == "rms" else layer_norm(D, 51)
        self.gate, self.out = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        if self.form == "input":
            return self.out(h * F.silu(self.gate(x)))
        if self.form == "self":
            return self.out(h * torch.sigmoid(self.gate(h)))
        return self.out(h * h)


def test_scale_passes_a_gate_multiply() -> None:
    model = _Gated("input").eval()
    result = _fold(model)
    assert [(f.norm, f.into) for f in result.folded] == [("norm", ("out.weight",))]
    assert torch.equal(result.model.gate.weight, model.gate.weight)  # reads x, not the norm
    both = _fold(_Gated("self").eval())
    assert [(f.norm, f.into) for f in both.folded] == [("norm", ("gate.weight", "out.weight"))]


def test_a_shift_or_a_squared_scale_does_not_pass_a_product() -> None:
    k = _only_kept(_fold(_Gated("input", norm="ln").eval()))
    assert (k.norm, k.code) == ("norm", "nonlinear_consumer")
    assert k.reason == ("the output of the norm at norm (layer_norm) is multiplied by another tensor (mul "
                        "(forward)) before its Linear layers: its scale could pass that product, its shift "
                        "cannot")  # fmt: skip
    k = _only_kept(_fold(_Gated("square").eval()))
    assert (k.norm, k.code) == ("norm", "nonlinear_consumer")
    assert k.reason == ("the output of the norm at norm (mul) feeds mul (forward), not a Linear over its "
                        "normalized axis")  # fmt: skip


class _NormThenGelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln, self.fc = layer_norm(D, 30), nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.gelu(self.ln(x)))


def test_norm_into_an_activation_is_kept() -> None:
    k = _only_kept(_fold(_NormThenGelu().eval()))
    assert (k.norm, k.code) == ("ln", "nonlinear_consumer")
    assert k.reason == ("the output of the norm at ln (layer_norm) feeds gelu (forward), not a Linear over "
                        "its normalized axis")


class _SharedNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln, self.a, self.b = layer_norm(D, 31), nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(self.ln(x)) + self.b(self.ln(2 * x))


def test_one_norm_called_twice_is_kept_for_both_calls() -> None:
    result = _fold(_SharedNorm().eval())
    assert result.folded == [] and [(k.norm, k.code) for k in result.kept] == [
        ("ln:layer_norm", "shared_norm"),
        ("ln:layer_norm_1", "shared_norm"),
    ]
    assert result.kept[0].reason == (
        "ln.weight is also read by ln (layer_norm): a norm called at several places (or a weight shared) "
        "cannot be made parameter-free for one of them"
    )


# --- the proof, the fixpoint, dtypes --------------------------------------------------------------


def test_planning_the_folded_model_again_finds_nothing() -> None:
    first = _fold(RMSGatedMLP(offset=True).eval())
    again = _fold(first.model)
    assert again.folded == [] and [(k.norm, k.code) for k in again.kept] == [("norm", "no_affine")]
    shift = _fold(_fold(LNIntoBiasFree().eval()).model)  # the shift kept as beta / gamma: nothing moves
    assert shift.folded == [] and [k.code for k in shift.kept] == ["new_bias_needed"]


def test_bf16_model_is_folded_and_proved_in_fp32_then_cast_back_once() -> None:
    model = PreLNAttention().to(torch.bfloat16).eval()
    result = _fold(model, X.to(torch.bfloat16))
    assert result.model.q.weight.dtype == torch.bfloat16 and result.parity.outputs[0].dtype == "float32"
    g = _wide(model.ln.weight)
    assert torch.equal(result.model.q.weight, (_wide(model.q.weight) * g).to(torch.bfloat16))  # one rounding
    assert torch.equal(result.model.ln.weight, torch.ones(D, dtype=torch.bfloat16))


def test_inplace_changes_the_callers_model() -> None:
    model = PreLNAttention().eval()
    result = _fold(model, inplace=True)
    assert result.model is model and torch.equal(model.ln.weight, torch.ones(D))


def test_widened_graph_is_exact_where_a_float64_copy_is_not() -> None:
    """HF norms cast to float32 inside: ``model.double()`` keeps that rounding, the widened graph not."""
    norm = HFRMSNorm(D, 40).eval()
    x = X.double()
    exact = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * _wide(norm.weight)
    program = capture(norm, (X,), CaptureOptions()).program
    assert (widened(program)(x) - exact).abs().max() < 1e-14
    assert (copy.deepcopy(norm).double()(x) - exact).abs().max() > 1e-9  # float32 rounding stays


def test_a_wrong_fold_fails_the_proof() -> None:
    """Dropping the shift, or forgetting Gemma's ``1 +``: the widened reference catches both."""
    for model, corrupt in ((PreLNAttention(), "q.bias"), (RMSGatedMLP(offset=True), "gate.weight")):
        model.eval()
        result = _fold(model)
        original = copy.deepcopy(model)
        values = result.plan.values(lambda fqn, m=original: m.get_parameter(fqn))
        values[corrupt] = _wide(original.get_parameter(corrupt))  # that consumer left as it was
        wrong = copy.deepcopy(original)
        apply_plan(wrong, result.plan, values)
        program = capture(original, (X,), CaptureOptions()).program
        assert not widened_parity(original, program, wrong, (X,), ParityRule()).passed


def test_parity_failure_raises_and_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from normfold.engine.norm_affine import records

    model = PreLNAttention().eval()
    before = copy.deepcopy(model.state_dict())
    real = records.fold_values

    def off_by_a_bit(fold, value):  # type: ignore[no-untyped-def]
        out = real(fold, value)
        out["v.bias"] = out["v.bias"] + 1e-2  # (a shift of k cancels in the softmax)
        return out

    monkeypatch.setattr(records, "fold_values", off_by_a_bit)
    with pytest.raises(normfold.ParityError, match=r"differs from the original model.*nothing was changed"):
        normfold.fold_norm_affine(model, X, inplace=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fp16_fold_that_would_overflow_is_kept() -> None:
    model = LNIntoBiasFree().eval()
    with torch.no_grad():
        model.proj.weight[0, 3] = 6e4  # fits float16 (max 65504) until the norm's scale 1.3 moves in
        model.ln.weight[3] = 1.3
    model = model.half()
    result = _fold(model, X.half())
    k = _only_kept(result)
    assert (k.norm, k.code) == ("ln", "overflow")
    # 6e4 * float16(1.3) = 77988.3
    assert k.reason == "folding ln makes proj.weight (max |value| 77988.3, torch.float16) overflow"
    assert torch.equal(result.model.proj.weight, model.proj.weight)


def test_fp16_shift_kept_in_the_norm_that_would_overflow_is_kept() -> None:
    """With no bias slot the shift stays in the norm as beta / gamma: a tiny gamma makes that value
    leave float16's range, which is checked like any folded value (it became inf before)."""
    model = LNIntoBiasFree().eval()
    with torch.no_grad():
        model.ln.weight[3], model.ln.bias[3] = 1e-4, 10.0  # beta / gamma ~ 1e5 > 65504
    model = model.half()
    k = _only_kept(_fold(model, X.half()))
    assert (k.norm, k.code) == ("ln", "overflow")
    assert k.reason.startswith("folding ln makes ln.bias (max |value| 99983.") and "torch.float16" in k.reason


def test_arguments_are_checked() -> None:
    with pytest.raises(normfold.UsageError, match=r"fold_norm_affine\(\) expects a torch.nn.Module, got str"):
        normfold.fold_norm_affine("model", X)  # type: ignore[arg-type]
    with pytest.raises(normfold.UsageError, match=r"fold_norm_affine\(\) needs example_inputs"):
        normfold.fold_norm_affine(PreLNAttention(), None)  # type: ignore[arg-type]


class _PlainNorms(nn.Module):
    """A LayerNorm without affine parameters (nothing to fold) and one without a shift."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(60)
        self.plain, self.scale_only = nn.LayerNorm(D, elementwise_affine=False), nn.LayerNorm(D, bias=False)
        with torch.no_grad():
            self.scale_only.weight.uniform_(0.3, 1.7)
        self.a, self.b = nn.Linear(D, 4, bias=False), nn.Linear(D, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(self.plain(x)) + self.b(self.scale_only(x))


def test_a_norm_without_affine_gets_a_record_and_a_scale_alone_folds() -> None:
    model = _PlainNorms().eval()
    result = _fold(model)
    assert [(f.norm, f.into, f.code) for f in result.folded] == [("scale_only", ("b.weight",), None)]
    assert [(k.norm, k.code, k.reason) for k in result.kept] == [
        ("plain", "no_affine", "the norm at plain (layer_norm) has no scale or shift: nothing to fold")
    ]
    assert result.model.b.bias is None  # no shift: no bias needed


class _Cohere(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(61)
        self.input_layernorm, self.q = CohereLayerNorm(D, 62), nn.Linear(D, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(self.input_layernorm(x))


def test_cohere_layer_norm_with_its_centring_written_twice() -> None:
    model = _Cohere().eval()
    (f,) = _fold(model).folded
    assert (f.norm, f.kind, f.pattern) == ("input_layernorm", "layer_norm", "hand-written")
    assert f.into == ("q.weight",)


@pytest.mark.parametrize("block", [PreLNAttention, LNIntoBiasFree, RMSGatedMLP])
def test_the_folded_state_dict_loads_into_the_users_own_class(block: type[nn.Module]) -> None:
    """Same keys, same shapes: a fresh instance of the class loads the folded weights (strict) and
    computes what the folded model computes (the shift kept in the norm needs no new key)."""
    result = _fold(block().eval())
    fresh = block().eval()
    fresh.load_state_dict(result.model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(X), result.model(X))

"""``normfold.fold_norm_affine`` on Hugging Face architectures (issue 22's benchmark).

Not part of CI: transformers is never the project's dependency. It runs in a separate environment
next to an editable normfold::

    python3 -m venv .hfvenv
    .hfvenv/bin/pip install torch==2.13.0
    .hfvenv/bin/pip install -e .
    .hfvenv/bin/pip install transformers
    OMP_NUM_THREADS=1 .hfvenv/bin/python benchmarks/norm_affine.py --json benchmarks/norm_affine_latest.json

Nothing is downloaded: every model is built from a small random-init config (hidden 64, 2 layers,
4 heads, intermediate 128, vocabulary 128; ``use_cache=False``) in eval mode, and every norm's scale
is drawn from U(0.5, 1.5) and its shift from U(-0.3, 0.3) (the model's own initialisation is 1 / 0:
a wrong fold would not show), seeded. Input: token ids of batch 2, sequence 8 (ViT: 2 images of
32x32; T5: the ids reversed as decoder input); MoE configs: 4 experts, top 2.

Per architecture: the norms found (every norm-like op of the graph, folded or kept), those folded
(and among them those whose LayerNorm shift stays in the norm: its Linear has no bias,
``new_bias_needed``), those kept by code; the parity proof (``fold_norm_affine``'s own, against the
original's captured graph widened to float64): passed, and the ratio fold error / the original's
own error (the rule's noise: its distance from the float64 run, or a perturbed run's if larger;
worst output; the rule allows up to its factor); the fold's wall time (capture, plan,
apply, the float64 proof on the rule's input sets, the re-capture and re-plan) against one
``torch.export.export`` of the same model, and the plan + apply alone as a share of that capture;
and a ``save_pretrained`` -> ``from_pretrained`` round trip
into the model's own class (a temporary directory) whose logits must equal the folded model's.
A model with a tied LM head runs twice: by default (the norm before the head is kept,
``tied_weight``) and with ``untie=True`` (it folds, and ``config.tie_word_embeddings`` becomes
False so the reload does not tie it back). An architecture whose config, model or export fails is
listed with the first line of its exception and counted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BATCH, SEQ, VOCAB = 2, 8, 128

DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=64,
    head_dim=16,
)
DROP = "<not set>"  # an override that removes a key of DECODER the config class does not take
MOE = dict(num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)

#: label -> (model_type, config overrides, task); task picks the Auto class and the inputs
ARCHS: dict[str, tuple[str, dict[str, Any], str]] = {
    "Llama": ("llama", {}, "causal"),
    "Llama (tied head)": ("llama", {"tie_word_embeddings": True}, "causal"),
    "Mistral": ("mistral", {}, "causal"),
    "Qwen2": ("qwen2", {"tie_word_embeddings": True}, "causal"),
    "Qwen3": ("qwen3", {}, "causal"),
    "Qwen3-MoE": ("qwen3_moe", {**MOE, "decoder_sparse_step": 1, "mlp_only_layers": []}, "causal"),
    "Qwen2-MoE": ("qwen2_moe", {**MOE, "shared_expert_intermediate_size": 64}, "causal"),
    "Mixtral": ("mixtral", MOE, "causal"),
    "Gemma": ("gemma", {}, "causal"),
    "Gemma2": ("gemma2", {}, "causal"),
    "Gemma3 (text)": ("gemma3_text", {}, "causal"),
    "Phi": ("phi", {}, "causal"),
    "Phi-3": ("phi3", {"pad_token_id": 0}, "causal"),
    "OPT (pre-LN)": (
        "opt",
        {"ffn_dim": 128, "word_embed_proj_dim": 64, "do_layer_norm_before": True},
        "causal",
    ),
    "OPT (post-LN)": (
        "opt",
        {"ffn_dim": 128, "word_embed_proj_dim": 64, "do_layer_norm_before": False},
        "causal",
    ),
    "GPT-2": ("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64}, "causal"),
    "GPT-NeoX": ("gpt_neox", {}, "causal"),
    "GPT-J": (
        "gptj",
        {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64, "rotary_dim": 8},
        "causal",
    ),
    "Falcon": (
        "falcon",
        {
            "head_dim": DROP,
            "num_kv_heads": 4,
            "new_decoder_architecture": False,
            "parallel_attn": True,
            "alibi": False,
        },
        "causal",
    ),
    "Cohere": ("cohere", {}, "causal"),
    "StableLM": ("stablelm", {}, "causal"),
    "StarCoder2": ("starcoder2", {}, "causal"),
    "OLMo": ("olmo", {}, "causal"),
    "OLMo2": ("olmo2", {}, "causal"),
    "Granite": ("granite", {}, "causal"),
    "Nemotron": ("nemotron", {}, "causal"),
    "DeepSeek-V3": (
        "deepseek_v3",
        {
            **MOE,
            "n_routed_experts": 4,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
            "head_dim": 8,
            "num_key_value_heads": 4,
            "q_lora_rank": 32,
            "kv_lora_rank": 16,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
        },
        "causal",
    ),
    "BLOOM": ("bloom", {"n_layer": 2, "n_head": 4}, "causal"),
    "MPT": (
        "mpt",
        {"d_model": 64, "n_heads": 4, "n_layers": 2, "expansion_ratio": 2, "max_seq_len": 64},
        "causal",
    ),
    "SmolLM3": ("smollm3", {"pad_token_id": 0}, "causal"),
    "GLM4": ("glm4", {"pad_token_id": 0}, "causal"),
    "ERNIE 4.5": ("ernie4_5", {}, "causal"),
    "EXAONE4": ("exaone4", {}, "causal"),
    "Qwen3-Next": (
        "qwen3_next",
        {
            **MOE,
            "linear_num_value_heads": 4,
            "linear_num_key_heads": 2,
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
            "shared_expert_intermediate_size": 64,
        },
        "causal",
    ),
    "gpt-oss": ("gpt_oss", {**MOE, "num_local_experts": 4, "experts_per_token": 2}, "causal"),
    "LFM2": ("lfm2", {"block_ff_dim": 128, "full_attn_idxs": [1]}, "causal"),
    "Llama4 (text)": (
        "llama4_text",
        {**MOE, "intermediate_size_mlp": 128, "interleave_moe_layer_step": 1},
        "causal",
    ),
    "Phi-MoE": ("phimoe", MOE, "causal"),
    "Granite-MoE": ("granitemoe", MOE, "causal"),
    "OLMoE": ("olmoe", MOE, "causal"),
    "BERT": ("bert", {"type_vocab_size": 2}, "masked"),
    "ViT": ("vit", {"image_size": 32, "patch_size": 8, "num_channels": 3, "num_labels": 10}, "image"),
    "T5": ("t5", {"d_model": 64, "d_ff": 128, "d_kv": 16, "num_layers": 2, "num_heads": 4}, "seq2seq"),
}


def tiny_config(model_type: str, overrides: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    kwargs = {**DECODER, "use_cache": False, **overrides}
    config = AutoConfig.for_model(model_type, **{k: v for k, v in kwargs.items() if v != DROP})
    config._attn_implementation = "eager"
    return config


def build(model_type: str, overrides: dict[str, Any], task: str, seed: int) -> Any:
    import torch
    import transformers as tf

    auto = {
        "causal": tf.AutoModelForCausalLM,
        "masked": tf.AutoModelForMaskedLM,
        "image": tf.AutoModelForImageClassification,
        "seq2seq": tf.AutoModelForSeq2SeqLM,
    }[task]
    torch.manual_seed(seed)
    model = auto.from_config(tiny_config(model_type, overrides)).eval()
    randomize_norms(model, seed)
    return model


def randomize_norms(model: Any, seed: int) -> None:
    """Every norm module's 1-d scale ~ U(0.5, 1.5), shift ~ U(-0.3, 0.3) (module docstring)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if "norm" not in type(module).__name__.lower() and "ln" not in name.rpartition(".")[2].lower():
                continue
            for attr, p in module.named_parameters(recurse=False):
                if p.dim() != 1:
                    continue
                if attr == "bias":
                    p.copy_(torch.empty(p.shape).uniform_(-0.3, 0.3, generator=gen))
                else:
                    p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=gen))


def inputs_of(task: str, model: Any) -> tuple[Any, ...]:
    import torch

    gen = torch.Generator().manual_seed(1)
    if task == "image":
        return (torch.randn(BATCH, 3, 32, 32, generator=gen),)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    if task == "seq2seq":
        return (ids, torch.ones_like(ids), ids.flip(1))  # input_ids, attention_mask, decoder_input_ids
    return (ids,)


def logits(model: Any, inputs: tuple[Any, ...]) -> Any:
    import torch

    with torch.no_grad():
        return model(*inputs).logits


def tied_head(model: Any) -> bool:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and emb is not None and head.weight is emb.weight


def round_trip(result: Any, inputs: tuple[Any, ...]) -> dict[str, Any]:
    """The folded model through ``save_pretrained`` -> ``from_pretrained`` of its own class."""
    import torch

    model = result.model
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        loaded = type(model).from_pretrained(tmp, attn_implementation="eager").eval()
    before, after = logits(model, inputs), logits(loaded, inputs)
    diff = float((before - after).abs().max())
    return {
        "equal": bool(torch.equal(before, after)),
        "max_abs_diff": diff,
        "tied_after_load": tied_head(loaded),
    }


def ratio(report: Any) -> float | None:
    """The worst output's fold error / the original's own error (both against the float64 run)."""
    ratios = [
        o.exact_error / o.noise for o in report.outputs if o.noise > 0 and o.exact_error == o.exact_error
    ]
    return max(ratios) if ratios else None


def one_run(model: Any, inputs: tuple[Any, ...], untie: bool) -> dict[str, Any]:
    import normfold

    start = time.perf_counter()
    result = normfold.fold_norm_affine(model, inputs, untie=untie)
    fold_s = time.perf_counter() - start
    kept = Counter(k.code for k in result.kept)
    row = {
        "untie": untie,
        "norms": len(result.folded) + len(result.kept),
        "folded": len(result.folded),
        "shift_kept": sum(1 for f in result.folded if f.code is not None),
        "untied": [u for f in result.folded for u in f.untied],
        "kept": dict(sorted(kept.items())),
        "kept_detail": [{"norm": k.norm, "code": k.code, "reason": k.reason} for k in result.kept],
        "parity_passed": bool(result.parity.passed),
        "parity_ratio": ratio(result.parity),
        "replan_folds": result.replan_folds,
        "fold_s": fold_s,
        "plan_apply_s": plan_apply_seconds(model, inputs, untie),
        "notes": list(result.notes),
    }
    row["round_trip"] = round_trip(result, inputs)
    return row


def plan_apply_seconds(model: Any, inputs: tuple[Any, ...], untie: bool) -> float:
    """The plan and its application alone (no capture, no proof): the engine's steps, timed apart."""
    import copy

    from normfold.engine.capture import capture
    from normfold.engine.norm_affine.apply import apply_plan, tensor_of
    from normfold.engine.norm_affine.planner import plan
    from normfold.engine.norm_affine.torch_norms import TorchNormView
    from normfold.norm_affine import module_facts
    from normfold.prepare import capture_options

    work = copy.deepcopy(model).eval()
    cap = capture(work, inputs, capture_options(inputs, True))
    start = time.perf_counter()
    value = lambda fqn: tensor_of(work, fqn)  # noqa: E731
    the_plan = plan(TorchNormView.of(cap), module_facts(work, False, untie), value)
    apply_plan(work, the_plan, the_plan.values(value))
    return time.perf_counter() - start


def capture_seconds(model: Any, inputs: tuple[Any, ...]) -> float:
    import torch

    start = time.perf_counter()
    torch.export.export(model, inputs, strict=False)
    return time.perf_counter() - start


def bench(label: str, model_type: str, overrides: dict[str, Any], task: str, seed: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"arch": label, "model_type": model_type}
    try:
        model = build(model_type, overrides, task, seed)
        inputs = inputs_of(task, model)
        entry["class"] = type(model).__name__
        entry["tied"] = tied_head(model)
        entry["capture_s"] = capture_seconds(model, inputs)
    except Exception as e:
        entry["skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        return entry
    entry["runs"] = []
    for untie in (False, True) if entry["tied"] else (False,):
        try:
            entry["runs"].append(one_run(model, inputs, untie))
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else ""
            entry["runs"].append(
                {
                    "untie": untie,
                    "error": f"{type(e).__name__}: {first}"[:500],
                    "traceback": traceback.format_exc()[-2000:],
                }
            )
    return entry


def _fmt_kept(kept: dict[str, int]) -> str:
    return ", ".join(f"{n} {c}" for c, n in kept.items()) or "-"


def table(entries: list[dict[str, Any]]) -> str:
    lines = [
        "| architecture | norms | folded (shift kept) | kept, by code | parity ratio "
        "| fold / capture (plan+apply) | round trip |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        if "skipped" in e:
            lines.append(f"| {e['arch']} | skipped: {e['skipped'][:90]} | | | | | |")
            continue
        for run in e["runs"]:
            label = e["arch"] + (" untie=True" if run["untie"] else " (tied, default)" if e["tied"] else "")
            if "error" in run:
                lines.append(f"| {label} | error: {run['error'][:120]} | | | | | |")
                continue
            parity = f"{run['parity_ratio']:.2f}" if run["parity_ratio"] is not None else "n/a"
            parity += "" if run["parity_passed"] else " FAIL"
            rt = run["round_trip"]
            rts = "equal" if rt["equal"] else f"diff {rt['max_abs_diff']:.1e}"
            plan = 100 * run["plan_apply_s"] / e["capture_s"]
            lines.append(
                f"| {label} | {run['norms']} | {run['folded']} ({run['shift_kept']}) "
                f"| {_fmt_kept(run['kept'])} "
                f"| {parity} | {run['fold_s']:.2f} s / {e['capture_s']:.2f} s ({plan:.0f}%) | {rts} |"
            )
    return "\n".join(lines)


def totals(entries: list[dict[str, Any]]) -> dict[str, Any]:
    ran = [e for e in entries if "skipped" not in e]
    first = [e["runs"][0] for e in ran if "error" not in e["runs"][0]]
    best = [next((r for r in reversed(e["runs"]) if "error" not in r), None) for e in ran]
    best = [r for r in best if r is not None]
    kept: Counter[str] = Counter()
    for r in best:
        kept.update(r["kept"])
    runs = [r for e in ran for r in e["runs"]]
    return {
        "architectures": len(entries),
        "skipped": len(entries) - len(ran),
        "ran": len(ran),
        "errors": sum(1 for r in runs if "error" in r),
        "norms": sum(r["norms"] for r in best),
        "folded": sum(r["folded"] for r in best),
        "folded_default": sum(r["folded"] for r in first),
        "shift_kept": sum(r["shift_kept"] for r in best),
        "kept": dict(sorted(kept.items())),
        "parity_failed": sum(1 for r in runs if "error" not in r and not r["parity_passed"]),
        "worst_parity_ratio": max((r["parity_ratio"] or 0.0 for r in runs if "error" not in r), default=None),
        "round_trips_equal": sum(1 for r in runs if "error" not in r and r["round_trip"]["equal"]),
        "round_trips": sum(1 for r in runs if "error" not in r),
        "replan_folds": sum(r["replan_folds"] for r in runs if "error" not in r),
        "plan_apply_over_capture_median": _median(
            [r["plan_apply_s"] / e["capture_s"] for e in ran for r in e["runs"] if "error" not in r]
        ),
        "fold_over_capture_median": _median(
            [r["fold_s"] / e["capture_s"] for e in ran for r in e["runs"] if "error" not in r]
        ),
    }


def _median(xs: list[float]) -> float | None:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--json", type=Path, help="write the results here (refused if it exists, see --force)"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing --json file")
    parser.add_argument("--only", nargs="*", help="architecture labels to run (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.json is not None and args.json.exists() and not args.force:
        print(f"{args.json} exists; pass --force to replace it", file=sys.stderr)
        return 2
    try:
        import transformers
    except ImportError:
        print(
            "this benchmark needs transformers (its own environment: see the module docstring)",
            file=sys.stderr,
        )
        return 2
    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    entries = []
    started = time.perf_counter()
    for label, (model_type, overrides, task) in ARCHS.items():
        if args.only and label not in args.only:
            continue
        with contextlib.redirect_stderr(open(os.devnull, "w")):
            entry = bench(label, model_type, overrides, task, args.seed)
        entries.append(entry)
        status = entry.get("skipped") or "; ".join(
            r.get("error")
            or f"{r['folded']}/{r['norms']} folded, kept {_fmt_kept(r['kept'])}, "
            f"parity {'ok' if r['parity_passed'] else 'FAIL'}, round trip "
            f"{'equal' if r['round_trip']['equal'] else 'DIFF'}"
            for r in entry["runs"]
        )
        print(f"{label}: {status}", flush=True)
    result = {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "setup": {"batch": BATCH, "seq": SEQ, "seed": args.seed, "threads": torch.get_num_threads()},
        "wall_s": time.perf_counter() - started,
        "totals": totals(entries),
        "architectures": entries,
    }
    print(table(entries))
    print(json.dumps(result["totals"], indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

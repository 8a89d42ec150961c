"""Fold BatchNorm in ~50 popular torchvision/timm classifiers; compare with fx fusion and the ONNX exporter.

Not part of CI: torchvision and timm are never test dependencies. Install them in a separate
environment next to an editable normfold, with the CUDA build of torch from PyPI (it runs on CPU)::

    python -m venv /work/rmvenv
    /work/rmvenv/bin/pip install torch==2.13.0 torchvision==0.28.0 timm \\
        onnx onnxruntime onnxscript typer rich safetensors
    /work/rmvenv/bin/pip install --no-deps -e .

(Where a pip config or ``PIP_FIND_LINKS`` points pip at a local folder holding a ``+cpu`` torch
wheel, prefix both installs with ``env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null``: torchvision
from PyPI needs PyPI's torch, or ``torchvision::nms`` is missing.)

Run it (on 2 CPU cores, 20 s to several minutes a model: the float64 parity runs of the
``verify`` and reparameterization columns dominate; timm/mobileone_s0, trained with four
branches per block, took 501 s while CI shared the cores)::

    /work/rmvenv/bin/python benchmarks/real_models.py --json benchmarks/real_models_latest.json
    /work/rmvenv/bin/python benchmarks/real_models.py --models resnet18,timm/levit_128s --skip-onnx
    /work/rmvenv/bin/python benchmarks/real_models.py --end-to-end 3   # about 15 minutes

``--timing ROUNDS`` times only ``normfold.fold`` against one capture (the ``fold / capture``
column), ROUNDS interleaved rounds a model after a warm-up fold, the fastest of each, the garbage
of earlier calls collected before every timed call: about 15 minutes for the 66 models, short
enough to make with nothing else running (``--json`` keeps the rows)::

    cd benchmarks && /work/rmvenv/bin/python real_models.py --timing 3 --json real_models_timing_latest.json

``--end-to-end REPEATS`` times only ``normfold fold real_models:random_model --out x.onnx`` against
a bare ``torch.onnx.export`` of the same model, each a fresh process (the suite's end-to-end rows,
``benchmarks/suite.py``), on twelve models of the list unless ``--models`` names others.

Models are built with random weights (``weights=None`` / ``pretrained=False``). Every
``_BatchNorm`` then gets seeded random statistics and affine parameters (running_mean ~ N(0, 0.5),
running_var ~ U(0.5, 2), weight ~ U(0.5, 1.5), bias ~ N(0, 0.2)), so that no fold is trivially
exact and timm's zero-initialised last norm of a residual branch does not hide an error. The
input is a seeded batch of 2 at 3x160x160, or at the size a model requires (``--size`` changes
the default; models with a fixed input size keep theirs). A name in ``--models`` may carry a
``tv/``, ``timm/``, ``seg/`` (torchvision segmentation) or ``det/`` (torchvision detection backbone
with FPN, :data:`DETECTION`) prefix; without one, torchvision is tried first.

Columns of the table (batch-norm ops are ATen nodes ``batch_norm`` or
``_native_batch_norm_legit_no_training`` of a ``torch.export.export(strict=False)`` graph):

* ``BN before``: batch-norm ops in the export of the original model.
* ``normfold left``: batch-norm ops left in ``normfold.fold(model, (x,)).program``.
* ``fx fuse left``: batch-norm ops in the export of ``torch.fx.experimental.optimization.fuse``'s
  output; ``fail`` when fuse (symbolic tracing) raises.
* ``ONNX left``: ``BatchNormalization`` nodes in ``torch.onnx.export(model, dynamo=True)`` of the
  original model, i.e. what the exporter's own optimizer leaves.
* ``ONNX after nf``: the same count for the ONNX export of normfold's folded program.
* ``ratio``: ``max(err_fold, err_fold_export) / err_orig``, where each error is the max abs
  difference from a float64 run of the original model: ``err_fold`` of ``result.model``,
  ``err_fold_export`` of ``result.program.module()`` and ``err_orig`` of the float32 original.
* ``verify``: ``normfold.verify(model, result.model, (x,))``, the parity rule ``normfold fold``
  applies (against a float64 run, allowing the model's own noise; on the batch, standard normal
  and uniform 0..255 inputs): ``pass`` or ``FAIL`` (a refused fold, listed under "Worth a look").
  At most 2 means folding costs at most twice the float32 model's own rounding error.
* ``eager left``: batch-norm ops in an export of ``result.model``, the eager module ``fold``
  returns (issue 20: equal to ``normfold left`` on every model).
* ``fold s``, ``capture s``, ``fold / capture``: wall time of one ``normfold.fold`` call (its
  default: reparameterization on) and of one ``torch.export.export`` with the same dynamic batch
  axis (:func:`capture`), the faster of ``TIMING_ROUNDS`` interleaved rounds each, and their
  ratio (the total row: median and p90); ``fx s``: ``fuse`` alone.
* ``failure``: the exception ``normfold.fold`` raised (type and first line).

After the table come the models with blocks of parallel branches (RepVGG, MobileOne, FastViT...):
what ``normfold.reparameterize`` merged into one conv, the sums that stay (by skip code), the
BatchNormalization / Conv / Add ops of the original and of the result, and the parity rule's
verdict on the merged model; then the norms normfold keeps for each model (grouped by skip code, with a
sample reason) and the cases worth a look: ONNX after normfold keeping more than normfold,
ratios above 2, failures. ``--json`` writes every number, error text and traceback; it is
rewritten after each model, so a long run that stops still leaves its results.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import logging
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import timm
import torch
import torchvision
from torch import nn
from torch.fx.experimental.optimization import fuse
from torch.nn.modules.batchnorm import _BatchNorm

import normfold
from normfold.engine.capture import CaptureOptions, dynamic_shapes

SEED = 0
BATCH = 2
DEFAULT_SIZE = 160

#: torchvision models and their constructor options (every one has BatchNorm)
TORCHVISION: dict[str, dict[str, Any]] = {
    "resnet18": {},
    "resnet50": {},
    "resnext50_32x4d": {},
    "wide_resnet50_2": {},
    "densenet121": {},
    "mobilenet_v2": {},
    "mobilenet_v3_small": {},
    "mobilenet_v3_large": {},
    "efficientnet_b0": {},
    "efficientnet_v2_s": {},
    "regnet_y_400mf": {},
    "regnet_x_400mf": {},
    "shufflenet_v2_x1_0": {},
    "mnasnet1_0": {},
    "googlenet": {"aux_logits": False, "init_weights": False},
    "inception_v3": {"aux_logits": False, "init_weights": False},
    "vgg11_bn": {},
}

#: input sizes torchvision models need (timm models say so in their pretrained_cfg)
TORCHVISION_SIZE = {"inception_v3": 299}

#: timm models with BatchNorm, one or two of each family
TIMM = [
    "resnet26d",
    "seresnext26d_32x4d",
    "resnetv2_50",
    "resnest14d",
    "res2net50_14w_8s",
    "skresnet18",
    "tresnet_m",
    "cspdarknet53",
    "cspresnet50",
    "dla34",
    "dpn68",
    "hrnet_w18_small",
    "selecsls42b",
    "ese_vovnet19b_dw",
    "gernet_s",
    "regnety_002",
    "rexnet_100",
    "lcnet_100",
    "mobilenetv3_large_100",
    "tf_mobilenetv3_small_100",
    "mobilenetv4_conv_small",
    "efficientnet_b0",
    "tf_efficientnet_b0",
    "mixnet_s",
    "mixnet_m",
    "hardcorenas_a",
    "fbnetc_100",
    "spnasnet_100",
    "ghostnet_100",
    "repvgg_a0",
    "mobileone_s0",
    "fastvit_t8",
    "inception_next_tiny",
    "levit_128s",
    "mobilevit_xs",
    "efficientvit_b0",
    "efficientvit_m0",
    # where the eager module once lagged the program (issue 20's clarification)
    "darknet53",
    "lcnet_050",
    "botnet26t_256",
    "regnety_008",
    "regnetz_b16",
    "repghostnet_050",
]

#: segmentation models (torchvision, random init, no backbone weights): their heads have BatchNorm too
SEGMENTATION = ["deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large", "fcn_resnet50"]

#: detection backbones with their feature pyramid (torchvision's detection models, without the
#: box heads, whose post-processing ``torch.export`` does not capture): ``NAME_fpn`` with
#: ``nn.BatchNorm2d``; ``_frozen``: torchvision's default ``FrozenBatchNorm2d``, a hand-written
#: ``x * scale + shift`` (no batch-norm op; its folds are counted under ``folded``)
DETECTION = ["resnet50_fpn", "mobilenet_v3_large_fpn", "resnet18_fpn_frozen"]

DEFAULT_MODELS = (
    [f"tv/{n}" for n in TORCHVISION] + [f"timm/{n}" for n in TIMM]
    + [f"seg/{n}" for n in SEGMENTATION] + [f"det/{n}" for n in DETECTION]
)  # fmt: skip

#: rounds of (capture, fold) timed back to back per model; the fastest of each counts
TIMING_ROUNDS = 2

#: ``--end-to-end`` models (fresh processes, each run takes seconds): one or two of each family
END_TO_END_MODELS = [
    *("tv/resnet18", "tv/resnet50", "tv/mobilenet_v3_large", "tv/efficientnet_b0", "tv/densenet121"),
    *("tv/regnet_y_400mf", "timm/cspresnet50", "timm/mixnet_s", "timm/repvgg_a0", "timm/fastvit_t8"),
    *("timm/levit_128s", "timm/efficientvit_m0"),
]

BN_OPS = {
    torch.ops.aten.batch_norm.default,
    torch.ops.aten._native_batch_norm_legit_no_training.default,
}

#: skip codes that are not kept BatchNorm ops (norms never called, per-sample norms)
NOT_KEPT = ("unused", "per_sample_statistics")

COLUMNS = [
    "model",
    "BN before",
    "normfold left",
    "eager left",
    "fx fuse left",
    "ONNX left",
    "ONNX after nf",
    "ratio",
    "verify",
    "fold s",
    "capture s",
    "fold / capture",
    "fx s",
    "failure",
]


# --- models and inputs -----------------------------------------------------------------------------


def resolve(name: str) -> str:
    """``tv/NAME`` or ``timm/NAME``; a bare name is torchvision's when it has one."""
    if name.startswith(("tv/", "timm/", "seg/", "det/")):
        return name
    return f"tv/{name}" if name in torchvision.models.list_models() else f"timm/{name}"


def build(name: str, size: int) -> tuple[nn.Module, tuple[int, int, int]]:
    """The model (random init) and the input shape it runs on."""
    source, _, arch = name.partition("/")
    if source == "seg":
        model = torchvision.models.get_model(arch, weights=None, weights_backbone=None)
        return _DictOutputs(model), (3, size, size)
    if source == "det":
        return detection_backbone(arch), (3, size, size)
    if source == "tv":
        model = torchvision.models.get_model(arch, weights=None, **TORCHVISION.get(arch, {}))
        side = TORCHVISION_SIZE.get(arch, size)
        return model, (3, side, side)
    model = timm.create_model(arch, pretrained=False)
    cfg = model.pretrained_cfg
    if cfg.get("fixed_input_size"):
        return model, tuple(cfg["input_size"])
    side = max(size, *cfg.get("min_input_size", (3, 0, 0))[1:])
    return model, (3, side, side)


class _DictOutputs(nn.Module):
    """A segmentation model whose ``OrderedDict`` output becomes a tuple (what the ONNX exporter
    and ``fx`` fuse take as graph outputs); the model keeps its module paths under ``model.``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model(x).values())


def detection_backbone(arch: str) -> nn.Module:
    """A torchvision detection backbone with its FPN (:data:`DETECTION`), outputs as a tuple."""
    from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    norm = FrozenBatchNorm2d if arch.endswith("_frozen") else nn.BatchNorm2d
    base = arch.removesuffix("_frozen").removesuffix("_fpn")
    if base.startswith("resnet"):
        model = resnet_fpn_backbone(backbone_name=base, weights=None, norm_layer=norm, trainable_layers=5)
    else:
        model = mobilenet_backbone(backbone_name=base, weights=None, fpn=True, norm_layer=norm,
                                   trainable_layers=6)  # fmt: skip
    return _DictOutputs(model)


def randomize_batch_norms(model: nn.Module, generator: torch.Generator) -> int:
    """Give every ``_BatchNorm`` (and torchvision ``FrozenBatchNorm2d``) random statistics and
    affine parameters; return how many there are."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    count = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                count += 1
                n = module.weight.numel()
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.2)
                continue
            if not isinstance(module, _BatchNorm):
                continue
            count += 1
            n = module.num_features
            if module.running_mean is not None:
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
            if module.weight is not None:
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.2)
    return count


def random_model(name: str, size: int = DEFAULT_SIZE) -> nn.Module:
    """The model as :func:`measure` builds it (random init, seeded random BatchNorm statistics),
    in eval mode: the factory ``normfold fold real_models:random_model`` calls in ``--end-to-end``."""
    model, _ = build(resolve(name), size)
    randomize_batch_norms(model, seed_everything(SEED))
    return model.eval()


def end_to_end(names: list[str], size: int, repeats: int) -> str:
    """``normfold fold --out x.onnx`` vs a bare ``torch.onnx.export`` of each model (the suite's
    end-to-end rows: fresh processes, imports and verification included, interleaved)."""
    from suite import END_TO_END_HEADER, end_to_end_row
    from suite import table as markdown_table

    rows = []
    here = str(Path(__file__).resolve().parent)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            shape = ",".join(map(str, (BATCH, *build(resolve(name), size)[1])))
            source = ["real_models:random_model", "--model-args", json.dumps({"name": name, "size": size}),
                      "--input-shape", shape]  # fmt: skip
            bare = (f"import torch, real_models\nmodel = real_models.random_model({name!r}, {size})\n"
                    f"torch.onnx.export(model, (torch.randn({shape}),), OUT, dynamo=True)")  # fmt: skip
            rows.append(end_to_end_row(name, source, bare, Path(tmp), repeats, env={"PYTHONPATH": here}))
            print(f"{name}: ratio {rows[-1][3]:.2f}", file=sys.stderr, flush=True)
    ratios = sorted(r[3] for r in rows)
    return markdown_table(END_TO_END_HEADER, rows) + f"\n\nmedian ratio {statistics.median(ratios):.2f}"


def timing(names: list[str], size: int, rounds: int, out: Path | None) -> str:
    """Only the ``fold / capture`` column, ``rounds`` interleaved (capture, fold) rounds per model,
    the fastest of each: a run short enough to make on a quiet machine (the full table takes hours)."""
    rows: list[dict[str, Any]] = []
    for name in names:
        generator = seed_everything(SEED)
        model, shape = build(name, size)
        randomize_batch_norms(model, generator)
        x = torch.randn(BATCH, *shape, generator=generator)
        row: dict[str, Any] = {"model": name, "input": [BATCH, *shape]}
        try:
            normfold.fold(model.eval(), (x,))  # warm: the first call of a model pays for its code paths
            captures, folds = [], []
            for _ in range(rounds):
                captures.append(timed(capture, model, x)[1])
                folds.append(timed(normfold.fold, model, (x,))[1])
            row.update(capture_s=min(captures), fold_s=min(folds), fold_capture=min(folds) / min(captures))
            print(f"{name}: {row['fold_capture']:.2f}", file=sys.stderr, flush=True)
        except Exception as e:
            row["failure"] = describe(e)
        rows.append(row)
        del model
        gc.collect()
        if out:
            meta = {"normfold": engine_version(), "torch": torch.__version__, "size": size, "rounds": rounds}
            out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    ratios = sorted(r["fold_capture"] for r in rows if "fold_capture" in r)
    lines = ["| model | capture s | fold s | fold / capture |", "|---|---|---|---|"]
    for r in rows:
        ratio = cell(r["fold_capture"]) if "fold_capture" in r else r.get("failure")
        lines.append(f"| {r['model']} | {cell(r.get('capture_s'))} | {cell(r.get('fold_s'))} | {ratio} |")
    p90 = ratios[min(len(ratios) - 1, math.ceil(0.9 * len(ratios)) - 1)] if ratios else float("nan")
    summary = f"median {statistics.median(ratios):.2f}, p90 {p90:.2f} over {len(ratios)} models"
    return "\n".join(lines) + "\n\n" + summary


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# --- counting -----------------------------------------------------------------------------------


def count_bn(program: torch.export.ExportedProgram) -> int:
    """Batch-norm ops in an exported program, nested graphs included."""
    return sum(
        node.op == "call_function" and node.target in BN_OPS
        for module in program.graph_module.modules()
        if isinstance(module, torch.fx.GraphModule)
        for node in module.graph.nodes
    )


def export(model: nn.Module, x: torch.Tensor) -> torch.export.ExportedProgram:
    return torch.export.export(model, (x,), strict=False)


def capture(model: nn.Module, x: torch.Tensor) -> torch.export.ExportedProgram:
    """One ``torch.export`` with the same dynamic shapes as ``normfold.fold``'s capture (a dynamic
    batch axis; static where the model fixes its batch, as fold falls back), under ``no_grad``
    like fold's: the like-for-like cost of one capture."""
    dynamic = dynamic_shapes((x,), CaptureOptions())
    with torch.no_grad():
        try:
            return torch.export.export(model, (x,), dynamic_shapes=dynamic, strict=False)
        except Exception:
            return torch.export.export(model, (x,), strict=False)


def count_onnx_bn(model: nn.Module | torch.export.ExportedProgram, x: torch.Tensor) -> int:
    """``BatchNormalization`` nodes in the dynamo ONNX export (graph, subgraphs and functions)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False)
        proto = onnx.load(str(path), load_external_data=False)

    def nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
        for node in graph.node:
            yield node
            for attr in node.attribute:
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                    yield from nodes(sub)

    all_nodes = [*nodes(proto.graph), *(n for f in proto.functions for n in f.node)]
    return sum(n.op_type == "BatchNormalization" for n in all_nodes)


# --- parity ---------------------------------------------------------------------------------------


def tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a model output (a tensor, or nested tuples/lists/dicts of them)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in tensors(item)]
    return []


def max_error(output: Any, reference: list[torch.Tensor]) -> float:
    got = tensors(output)
    if len(got) != len(reference):
        raise ValueError(f"{len(got)} output tensor(s), the reference has {len(reference)}")
    return max((g.double() - r).abs().max().item() for g, r in zip(got, reference, strict=True))


# --- one model ------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Keep the exporters' warnings and logs out of the table."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript", "normfold")
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def describe(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:200]


def timed(fn: Any, *args: Any) -> tuple[Any, float]:
    """``fn(*args)`` and its wall time; the garbage of earlier calls (a program and a model hold
    reference cycles) is collected first, so no timing pays for the one before it."""
    gc.collect()
    start = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - start


def measure(name: str, size: int, skip_onnx: bool) -> dict[str, Any]:
    """Every number of one row; a step that raises is recorded and the others still run."""
    generator = seed_everything(SEED)
    model, shape = build(name, size)
    row: dict[str, Any] = {"model": name, "input": [BATCH, *shape], "errors": {}}
    row["bn_modules"] = randomize_batch_norms(model, generator)
    model.eval()
    x = torch.randn(BATCH, *shape, generator=generator)

    def step(key: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as e:
            row["errors"][key] = describe(e)
            if key == "fold":
                row["failure"] = describe(e)
                row["traceback"] = traceback.format_exc()
            return None

    # timings: (capture, fold) rounds back to back on the same model, the fastest of each
    row["bn_before"] = count_bn(export(model, x))
    captures, folds, result = [], [], None
    for _ in range(TIMING_ROUNDS):
        captures.append(timed(capture, model, x)[1])
        timing = step("fold", timed, normfold.fold, model, (x,))
        if timing is None:
            break
        result, fold_s = timing
        folds.append(fold_s)
    row["capture_s"] = min(captures)
    if result is not None:
        row["fold_s"] = min(folds)
        row["fold_capture"] = row["fold_s"] / row["capture_s"]
        row["left"] = count_bn(result.program)
        row["eager_left"] = step("eager", lambda: count_bn(export(result.model, x)))
        row["folded"] = len(result.folded)
        row["export_only"] = len(result.export_only)
        row["replan_folds"] = result.replan_folds
        row["kept"] = [{"norm": s.norm, "type": s.norm_type, "code": s.code, "reason": s.reason}
                       for s in result.skipped if s.code not in NOT_KEPT]  # fmt: skip
    fused_timing = step("fx", timed, fuse, copy.deepcopy(model))
    if fused_timing is not None:
        fused, row["fx_s"] = fused_timing
        row["fx_left"] = step("fx_export", lambda: count_bn(export(fused, x)))
        del fused
    if row.get("fx_left") is None:
        row["fx_left"] = "fail"

    if not skip_onnx:
        row["onnx_left"] = step("onnx", count_onnx_bn, model, x)
        if result is not None:
            row["onnx_nf_left"] = step("onnx_nf", count_onnx_bn, result.program, x)

    step("parity", parity, row, model, result, x)
    step("reparam", reparam, row, model, x)
    return row


#: ops the reparameterization table counts (ATen ops as the ONNX ops they become)
REPARAM_OPS = ("BatchNormalization", "Conv", "Add")


def reparam(row: dict[str, Any], model: nn.Module, x: torch.Tensor) -> None:
    """``normfold.reparameterize``: blocks merged into one conv, sums that stay (by code), the
    op counts of the original and of the result's program, and the parity rule's verdict."""
    result = normfold.reparameterize(model, (x,))
    row["merged"] = len(result.merged)
    row["merged_export_only"] = sum(m.where == "export" for m in result.merged)
    row["not_merged"] = dict(Counter(m.code for m in result.not_merged))
    row["reparam_ops"] = {
        op: [result.ops_before.get(op, 0), result.ops_after.get(op, 0)] for op in REPARAM_OPS
    }
    if result.merged:  # the module and the program: a block merged in the export only is in the latter
        reports = [normfold.verify(model, m, (x,)) for m in (result.model, _Program(result.program))]
        row["reparam_verify"] = "pass" if all(r.passed for r in reports) else "FAIL"


class _Program(nn.Module):
    """An exported program as a module ``normfold.verify`` can run (it has no train/eval switch)."""

    def __init__(self, program: torch.export.ExportedProgram) -> None:
        super().__init__()
        self.program = program.module()

    def forward(self, *args: Any) -> Any:
        return self.program(*args)

    def train(self, mode: bool = True) -> nn.Module:
        return self


def parity(row: dict[str, Any], model: nn.Module, result: Any, x: torch.Tensor) -> None:
    with torch.no_grad():
        reference = [t.double() for t in tensors(copy.deepcopy(model).double()(x.double()))]
        scale = max(r.abs().max().item() for r in reference)
        errors = {"err_orig": max_error(model(x), reference)}
        if result is not None:
            errors["err_fold"] = max_error(result.model(x), reference)
            errors["err_fold_export"] = max_error(result.program.module()(x), reference)
    row.update(errors)
    row["ref_max"] = scale
    for key, value in errors.items():
        row[f"{key}_rel"] = value / scale if scale else math.nan
    if result is not None:
        worst = max(errors["err_fold"], errors["err_fold_export"])
        row["ratio"] = worst / errors["err_orig"] if errors["err_orig"] else math.inf * (worst > 0)
        report = normfold.verify(model, result.model, (x,))  # the parity rule, as `normfold fold` runs it
        row["verify"] = "pass" if report.passed else "FAIL"
        row["verify_failures"] = report.failures()


# --- report -----------------------------------------------------------------------------------------


def cell(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] * len(COLUMNS)) + "|"]
    for r in rows:
        values = [r["model"], r.get("bn_before"), r.get("left"), r.get("eager_left"), r.get("fx_left"),
                  r.get("onnx_left"), r.get("onnx_nf_left"), r.get("ratio"), r.get("verify"), r.get("fold_s"),
                  r.get("capture_s"), r.get("fold_capture"), r.get("fx_s"), r.get("failure", "")]  # fmt: skip
        lines.append("| " + " | ".join(cell(v) for v in values) + " |")
    lines.append("| " + " | ".join(cell(v) for v in totals(rows).values()) + " |")
    return "\n".join(lines)


def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def total(key: str) -> str | float | None:
        values = [r.get(key) for r in rows]
        numbers = [v for v in values if isinstance(v, (int, float))]
        if not numbers:
            return None
        missing = len(values) - len(numbers)
        return f"{cell(sum(numbers))} ({missing} n/a)" if missing else sum(numbers)

    ratios = [r["ratio"] for r in rows if isinstance(r.get("ratio"), float)]
    costs = sorted(r["fold_capture"] for r in rows if isinstance(r.get("fold_capture"), float))
    p90 = costs[min(len(costs) - 1, math.ceil(0.9 * len(costs)) - 1)] if costs else None
    failures = sum("failure" in r for r in rows)
    return {
        "model": f"**total ({len(rows)} models)**",
        "bn_before": total("bn_before"),
        "left": total("left"),
        "eager_left": total("eager_left"),
        "fx_left": total("fx_left"),
        "onnx_left": total("onnx_left"),
        "onnx_nf_left": total("onnx_nf_left"),
        "ratio": max(ratios, default=None),
        "verify": f"{sum(r.get('verify') == 'pass' for r in rows)} pass",
        "fold_s": total("fold_s"),
        "capture_s": total("capture_s"),
        "fold_capture": f"median {statistics.median(costs):.2f}, p90 {p90:.2f}" if costs else None,
        "fx_s": total("fx_s"),
        "failure": f"{failures} failure(s)",
    }


def reparam_section(rows: list[dict[str, Any]]) -> str:
    """The models with blocks of parallel branches: what ``normfold.reparameterize`` merged."""
    header = [
        "model",
        "blocks merged",
        "not merged",
        *(f"{op} before -> after" for op in REPARAM_OPS),
        "verify",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for r in rows:
        if not (r.get("merged") or r.get("not_merged")):
            continue
        merged = f"{r['merged']}" + (
            f" ({r['merged_export_only']} export only)" if r["merged_export_only"] else ""
        )
        kept = ", ".join(f"{code} {n}" for code, n in r["not_merged"].items()) or "-"
        ops = [f"{a} -> {b}" for a, b in r["reparam_ops"].values()]
        lines.append("| " + " | ".join([r["model"], merged, kept, *ops, r.get("reparam_verify", "-")]) + " |")
    if "reparam" in {k for r in rows for k in r["errors"]}:
        failed = [f"{r['model']}: {r['errors']['reparam']}" for r in rows if "reparam" in r["errors"]]
        lines.append("\nreparameterize failed on: " + "; ".join(failed))
    return "### Reparameterization (normfold.reparameterize)\n\n" + "\n".join(lines)


def kept_section(rows: list[dict[str, Any]]) -> str:
    lines = ["## Norms normfold keeps, by code", ""]
    for r in rows:
        kept = r.get("kept")
        if kept is None:
            lines.append(f"- {r['model']}: (fold failed)")
            continue
        if not kept:
            lines.append(f"- {r['model']}: none")
            continue
        codes = Counter(k["code"] for k in kept)
        lines.append(f"- {r['model']}: " + ", ".join(f"{code} x{n}" for code, n in codes.most_common()))
        for code in codes:
            k = next(k for k in kept if k["code"] == code)
            lines.append(f"    - {code}: e.g. `{k['norm']}` ({k['type']}): {k['reason']}")
    return "\n".join(lines)


def checks_section(rows: list[dict[str, Any]]) -> str:
    lines = ["## Worth a look", ""]
    for r in rows:
        nf, left = r.get("onnx_nf_left"), r.get("left")
        if isinstance(nf, int) and isinstance(left, int) and nf > left:
            lines.append(f"- {r['model']}: {nf} BatchNormalization in ONNX after normfold, {left} before")
        ratio = r.get("ratio")
        if isinstance(ratio, float) and not ratio <= 2:
            lines.append(
                f"- {r['model']}: ratio {ratio:.2f} (err_orig {r['err_orig']:.3g}, "
                f"err_fold {r['err_fold']:.3g}, err_fold_export {r['err_fold_export']:.3g}, "
                f"max|ref| {r['ref_max']:.3g})"
            )
        if r.get("verify") == "FAIL":
            lines.append(f"- {r['model']}: verify refused the fold: {r['verify_failures'][0]}")
        if r.get("bn_before") == 0:
            folded = f" ({r['folded']} hand-written norm(s) folded)" if r.get("folded") else ""
            lines.append(f"- {r['model']}: has no batch-norm op{folded}")
        if isinstance(r.get("eager_left"), int) and r.get("eager_left") != r.get("left"):
            lines.append(f"- {r['model']}: the eager module runs {r['eager_left']} batch-norm op(s), "
                         f"the program {r['left']}")  # fmt: skip
        for key, message in r["errors"].items():
            if not key.startswith("fx"):
                lines.append(f"- {r['model']}: {key} failed: {message}")
    if len(lines) == 2:
        lines.append("- nothing")
    fx = [f"- {r['model']}: {r['errors'].get('fx') or r['errors']['fx_export']}"
          for r in rows if r.get("fx_left") == "fail"]  # fmt: skip
    return "\n".join([*lines, "", "## fx fuse failures", "", *(fx or ["- none"])])


# --- main ---------------------------------------------------------------------------------------------


def warm_up() -> None:
    """The first export in a process pays one-off costs; pay them before anything is timed."""
    small = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    x = torch.randn(2, 3, 8, 8)
    export(small, x)
    normfold.fold(small, (x,))
    fuse(small)


def engine_version() -> str:
    """The commit of the normfold checkout, ``-dirty`` when it has uncommitted changes."""
    root = Path(normfold.__file__).parent
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True,
                             text=True, check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return normfold.__version__
    return out.stdout.strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated names (tv/NAME, timm/NAME or NAME)")
    parser.add_argument("--json", type=Path, help="write every row here (rewritten after each model)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="input side for resizable models")
    parser.add_argument("--skip-onnx", action="store_true", help="leave out the two ONNX exports")
    parser.add_argument("--end-to-end", type=int, metavar="REPEATS",
                        help="only time `normfold fold --out x.onnx` vs a bare torch.onnx.export, "
                        f"REPEATS times (default models: {', '.join(END_TO_END_MODELS)})")  # fmt: skip
    parser.add_argument("--timing", type=int, metavar="ROUNDS",
                        help="only time fold against capture, ROUNDS interleaved rounds a model")  # fmt: skip
    args = parser.parse_args(argv)
    names = [resolve(n.strip()) for n in args.models.split(",")] if args.models else DEFAULT_MODELS
    if args.end_to_end:
        print(end_to_end(names if args.models else END_TO_END_MODELS, args.size, args.end_to_end))
        return

    with quiet():
        warm_up()
    if args.timing:
        with quiet():
            text = timing(names, args.size, args.timing, args.json)
        print(text)
        return
    meta = {"normfold": engine_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "seed": SEED, "size": args.size}  # fmt: skip
    rows: list[dict[str, Any]] = []
    for i, name in enumerate(names, 1):
        start = time.perf_counter()
        try:
            with quiet():
                row = measure(name, args.size, args.skip_onnx)
        except Exception as e:  # the model could not be built or exported at all
            row = {"model": name, "errors": {"build": describe(e)}, "traceback": traceback.format_exc()}
        row["total_s"] = time.perf_counter() - start
        rows.append(row)
        gc.collect()
        status = row.get("failure") or ", ".join(f"{k}: {v}" for k, v in row["errors"].items()) or "ok"
        print(f"[{i}/{len(names)}] {name} {row['total_s']:.0f}s {status}", file=sys.stderr, flush=True)
        if args.json:
            args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))

    print(table(rows), reparam_section(rows), kept_section(rows), checks_section(rows), sep="\n\n")


if __name__ == "__main__":
    main()

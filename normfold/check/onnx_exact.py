"""The exact reference of an ONNX model, and its noise, for the parity of :func:`normfold.fold_onnx`.

onnxruntime's CPU provider has no float64 ``Conv``/``ConvTranspose``, and ``onnx.reference``
misreads ``BatchNormalization``-9 (its default ``momentum`` read as training mode) and lacks
grouped ``ConvTranspose``; so the original graph is run here by a small interpreter, op by op
with ``torch.nn.functional`` in float64:

* **exact run**: every initializer, constant and floating input in float64;
* **perturbed runs** (``rule.perturbations``, as :mod:`normfold.check.exact` for the PyTorch
  path): the graph in float32 (a float16 model's too) with every floating initializer ``t``
  replaced by ``round(t * (1 + d))``, ``d`` uniform in ``(-u, u)`` (:func:`normfold.check.exact.perturb`'s
  draw), which measure its sensitivity to the one rounding a fold applies. A float32 model's
  perturbed runs are made in onnxruntime instead (:mod:`normfold.check.onnx_parity`), fed the
  same perturbed initializers (:func:`perturbed_initializers`); this interpreter makes them for
  the others.

``BatchNormalization`` is computed from its definition, ``(x - mean) / sqrt(var + eps) * scale + B``
with the running statistics, as one pass ``x * a + c`` over the activations (``a = scale /
sqrt(var + eps)``, ``c = B - mean * a``, per channel in the run's dtype), for opsets 7
(``spatial=1``), 9, 14 and 15; one in training mode
(``training_mode=1``, or the statistics outputs of opsets before 14) has no exact run here. A graph
with an op outside :data:`OPS` has none either: :func:`exact_run` returns why, and the parity
report says so (the floor alone then applies, against the original's own run).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from normfold.errors import first_line

_Op = Callable[[onnx.NodeProto, list[Any], dict[str, Any], int], list[Any]]


class Unsupported(Exception):
    """The graph has an op (or an op's setting) this interpreter does not compute."""


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _pads(a: dict[str, Any], dims: int) -> list[int]:
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
        raise Unsupported("auto_pad SAME")
    pads = list(a.get("pads", [0] * 2 * dims))
    return pads


def _conv(node: onnx.NodeProto, x: list[Any], a: dict[str, Any], _: int) -> list[Any]:
    w = x[1]
    dims = w.dim() - 2
    pads = _pads(a, dims)
    if pads[:dims] != pads[dims:]:
        inp = F.pad(x[0], [p for i in reversed(range(dims)) for p in (pads[i], pads[i + dims])])
        pads = [0] * 2 * dims
    else:
        inp = x[0]
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    bias = x[2] if len(x) > 2 else None
    return [fn(inp, w, bias, a.get("strides", [1] * dims), pads[:dims], a.get("dilations", [1] * dims),
               a.get("group", 1))]  # fmt: skip


def _conv_transpose(node: onnx.NodeProto, x: list[Any], a: dict[str, Any], _: int) -> list[Any]:
    w = x[1]
    dims = w.dim() - 2
    pads = _pads(a, dims)
    if "output_shape" in a or pads[:dims] != pads[dims:]:
        raise Unsupported("ConvTranspose with output_shape or asymmetric pads")
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[dims]
    bias = x[2] if len(x) > 2 else None
    return [fn(x[0], w, bias, a.get("strides", [1] * dims), pads[:dims], a.get("output_padding", [0] * dims),
               a.get("group", 1), a.get("dilations", [1] * dims))]  # fmt: skip


def _batch_norm(node: onnx.NodeProto, x: list[Any], a: dict[str, Any], opset: int) -> list[Any]:
    training = bool(a.get("training_mode", 0)) if opset >= 14 else len([o for o in node.output if o]) > 1
    if training or (opset < 9 and a.get("spatial", 1) == 0):
        raise Unsupported("BatchNormalization in training mode or with spatial=0")
    view = [1, -1] + [1] * (x[0].dim() - 2)
    s, b, mean, var = (t.reshape(view) for t in x[1:5])
    scale = s / torch.sqrt(var + a.get("epsilon", 1e-5))
    return [torch.addcmul(b - mean * scale, x[0], scale)]


def _gemm(node: onnx.NodeProto, x: list[Any], a: dict[str, Any], _: int) -> list[Any]:
    m = x[0].t() if a.get("transA", 0) else x[0]
    w = x[1].t() if a.get("transB", 0) else x[1]
    y = a.get("alpha", 1.0) * (m @ w)
    return [y + a.get("beta", 1.0) * x[2] if len(x) > 2 and x[2] is not None else y]


def _reshape(node: onnx.NodeProto, x: list[Any], a: dict[str, Any], _: int) -> list[Any]:
    shape = [int(d) for d in x[1].tolist()]
    if not a.get("allowzero", 0):
        shape = [x[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [x[0].reshape(shape)]


def _axes(x: list[Any], a: dict[str, Any]) -> list[int] | None:
    if "axes" in a:
        return list(a["axes"])
    return [int(v) for v in x[1].tolist()] if len(x) > 1 and x[1] is not None else None


def _unsqueeze(node: onnx.NodeProto, x: list[Any], a: dict[str, Any], _: int) -> list[Any]:
    t, axes = x[0], _axes(x, a)
    for ax in sorted(v % (t.dim() + len(axes)) for v in axes):
        t = t.unsqueeze(ax)
    return [t]


def _squeeze(node: onnx.NodeProto, x: list[Any], a: dict[str, Any], _: int) -> list[Any]:
    axes = _axes(x, a)
    return [x[0].squeeze() if axes is None else x[0].squeeze(tuple(v % x[0].dim() for v in axes))]


def _pool(kind: str) -> _Op:
    def run(node: onnx.NodeProto, x: list[Any], a: dict[str, Any], _: int) -> list[Any]:
        k = list(a["kernel_shape"])
        dims = len(k)
        pads = _pads(a, dims)
        if pads[:dims] != pads[dims:] or a.get("dilations", [1] * dims) != [1] * dims:
            raise Unsupported(f"{kind} with asymmetric pads or dilations")
        strides, ceil = a.get("strides", [1] * dims), bool(a.get("ceil_mode", 0))
        if kind == "max":
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[dims]
            return [fn(x[0], k, strides, pads[:dims], ceil_mode=ceil)]
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[dims]
        return [fn(x[0], k, strides, pads[:dims], ceil, bool(a.get("count_include_pad", 0)))]

    return run


def _elementwise(fn: Callable[..., Any]) -> _Op:
    return lambda node, x, a, _: [fn(*x)]


def _concat(node: onnx.NodeProto, x: list[Any], a: dict[str, Any], _: int) -> list[Any]:
    return [torch.cat(x, dim=a["axis"])]


def _constant(node: onnx.NodeProto, x: list[Any], a: dict[str, Any], _: int) -> list[Any]:
    if "value" in a:
        return [torch.from_numpy(np.array(numpy_helper.to_array(a["value"])))]
    kinds = {"value_float": torch.float32, "value_floats": torch.float32, "value_int": torch.int64}
    for key, dtype in {**kinds, "value_ints": torch.int64}.items():
        if key in a:
            return [torch.tensor(a[key], dtype=dtype)]
    raise Unsupported("Constant without a tensor, float or int value")


def _cast(node: onnx.NodeProto, x: list[Any], a: dict[str, Any], _: int) -> list[Any]:
    to = onnx.helper.tensor_dtype_to_np_dtype(a["to"])
    if np.issubdtype(to, np.floating):  # floating values stay in the run's dtype
        return [x[0] if x[0].is_floating_point() else x[0].to(torch.float64)]
    return [x[0].to(torch.from_numpy(np.zeros(0, dtype=to)).dtype)]


def _reduce_mean(node: onnx.NodeProto, x: list[Any], a: dict[str, Any], _: int) -> list[Any]:
    axes = _axes(x, a)
    dims = list(range(x[0].dim())) if not axes else axes
    return [x[0].mean(dim=dims, keepdim=bool(a.get("keepdims", 1)))]


def _gather(node: onnx.NodeProto, x: list[Any], a: dict[str, Any], _: int) -> list[Any]:
    axis = a.get("axis", 0) % x[0].dim()
    idx = x[1].long()
    idx = torch.where(idx < 0, idx + x[0].shape[axis], idx)
    out = x[0].index_select(axis, idx.reshape(-1))
    return [out.reshape((*x[0].shape[:axis], *idx.shape, *x[0].shape[axis + 1 :]))]


def _slice(node: onnx.NodeProto, x: list[Any], a: dict[str, Any], _: int) -> list[Any]:
    starts, ends = x[1].tolist(), x[2].tolist()
    axes = x[3].tolist() if len(x) > 3 and x[3] is not None else list(range(len(starts)))
    steps = x[4].tolist() if len(x) > 4 and x[4] is not None else [1] * len(starts)
    index: list[slice] = [slice(None)] * x[0].dim()
    for st, en, ax, sp in zip(starts, ends, axes, steps, strict=True):
        index[ax % x[0].dim()] = slice(int(st), int(en), int(sp))
    if any(sp < 0 for sp in steps):
        raise Unsupported("Slice with a negative step")
    return [x[0][tuple(index)]]


def _reduce(fn: Callable[..., Any]) -> _Op:
    def run(node: onnx.NodeProto, x: list[Any], a: dict[str, Any], _: int) -> list[Any]:
        axes = _axes(x, a)
        dims = list(range(x[0].dim())) if not axes else [d % x[0].dim() for d in axes]
        return [fn(x[0], dims, bool(a.get("keepdims", 1)))]

    return run


def _softmax(node: onnx.NodeProto, x: list[Any], a: dict[str, Any], opset: int) -> list[Any]:
    if opset >= 13:
        return [torch.softmax(x[0], a.get("axis", -1))]
    # before opset 13: over the input read as 2-D, [prod(shape[:axis]), prod(shape[axis:])], axis 1
    axis = a.get("axis", 1) % x[0].dim()
    flat = x[0].reshape(int(np.prod(x[0].shape[:axis])), -1)
    return [torch.softmax(flat, 1).reshape(x[0].shape)]


def _clip(node: onnx.NodeProto, x: list[Any], a: dict[str, Any], opset: int) -> list[Any]:
    if opset < 11:  # bounds are attributes (default: none)
        return [x[0].clamp(a.get("min", -math.inf), a.get("max", math.inf))]
    lo, hi = (None if v is None else v.item() for v in [*x, None, None][1:3])
    return [x[0].clamp(lo, hi)]


def _split(node: onnx.NodeProto, x: list[Any], a: dict[str, Any], _: int) -> list[Any]:
    axis = a.get("axis", 0)
    sizes = a.get("split") or (x[1].tolist() if len(x) > 1 and x[1] is not None else None)
    n = len(node.output)
    if sizes is None:
        sizes = [-(-x[0].shape[axis] // n)] * n
        sizes[-1] = x[0].shape[axis] - sum(sizes[:-1])
    return list(torch.split(x[0], [int(v) for v in sizes], dim=axis))


OPS: dict[str, _Op] = {
    "HardSwish": _elementwise(F.hardswish),
    "HardSigmoid": lambda node, x, a, _: [(a.get("alpha", 0.2) * x[0] + a.get("beta", 0.5)).clamp(0, 1)],
    "Softmax": _softmax,
    "Erf": _elementwise(torch.erf),
    "Exp": _elementwise(torch.exp),
    "Log": _elementwise(torch.log),
    "Abs": _elementwise(torch.abs),
    "Pow": _elementwise(torch.pow),
    "Min": _elementwise(torch.minimum),
    "Max": _elementwise(torch.maximum),
    "Where": _elementwise(torch.where),
    "Equal": _elementwise(torch.eq),
    "Gather": _gather,
    "Slice": _slice,
    "Split": _split,
    "ReduceSum": _reduce(lambda t, d, k: t.sum(d, keepdim=k)),
    "ReduceMax": _reduce(lambda t, d, k: t.amax(d, keepdim=k)),
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "BatchNormalization": _batch_norm,
    "Gemm": _gemm,
    "MatMul": _elementwise(torch.matmul),
    "Add": _elementwise(torch.add),
    "Sub": _elementwise(torch.sub),
    "Mul": _elementwise(torch.mul),
    "Div": _elementwise(torch.div),
    "Sqrt": _elementwise(torch.sqrt),
    "Reciprocal": _elementwise(torch.reciprocal),
    "Neg": _elementwise(torch.neg),
    "Relu": _elementwise(torch.relu),
    "Sigmoid": _elementwise(torch.sigmoid),
    "Tanh": _elementwise(torch.tanh),
    "Identity": _elementwise(lambda t: t),
    "Dropout": lambda node, x, a, _: [x[0]],
    "LeakyRelu": lambda node, x, a, _: [F.leaky_relu(x[0], a.get("alpha", 0.01))],
    "Clip": _clip,
    "Reshape": _reshape,
    "Flatten": lambda node, x, a, _: [x[0].reshape(int(np.prod(x[0].shape[: a.get("axis", 1)])), -1)],
    "Transpose": lambda node, x, a, _: [x[0].permute(*(a.get("perm") or range(x[0].dim() - 1, -1, -1)))],
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Concat": _concat,
    "Constant": _constant,
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda node, x, a, _: [x[0].mean(dim=tuple(range(2, x[0].dim())), keepdim=True)],
    "GlobalMaxPool": lambda node, x, a, _: [x[0].amax(dim=tuple(range(2, x[0].dim())), keepdim=True)],
    "ReduceMean": _reduce_mean,
    "Shape": lambda node, x, a, _: [
        torch.tensor(x[0].shape[a.get("start", 0) : a.get("end")], dtype=torch.int64)
    ],
    "Expand": lambda node, x, a, _: [
        x[0] * torch.ones(tuple(int(d) for d in x[1].tolist()), dtype=x[0].dtype)
    ],
    "CastLike": lambda node, x, a, _: [x[0].to(x[1].dtype)],
    "Cast": _cast,
}


def initializer_tensors(
    model: onnx.ModelProto, dtype: torch.dtype | None = None, base_dir: Path | None = None
) -> dict[str, torch.Tensor]:
    """Every initializer of ``model``'s graph as a tensor, read once (the floating ones in
    ``dtype`` when given; external data from ``base_dir``), to be shared by every run of
    :func:`run_graph`."""
    found = {}
    for init in model.graph.initializer:
        t = torch.from_numpy(np.array(numpy_helper.to_array(init, str(base_dir) if base_dir else "")))
        found[init.name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return found


def perturbed_initializers(tensors: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The floating tensors of ``tensors``, each ``t * (1 + d)`` rounded once to its own dtype,
    ``d`` uniform in ``(-u, u)``, ``u`` the unit roundoff of that dtype, one seeded draw (the
    draw of :func:`normfold.check.exact.perturb`: ``t + t * d`` in float32, float64 for float64
    tensors, is ``t * (1 + d)`` to far below one rounding of ``t``'s dtype)."""
    gen = torch.Generator().manual_seed(seed)
    found = {}
    for name, t in tensors.items():
        if not t.is_floating_point():
            continue
        wide = torch.float64 if t.dtype == torch.float64 else torch.float32
        d = torch.rand(t.shape, generator=gen, dtype=wide).mul_(2).sub_(1).mul_(torch.finfo(t.dtype).eps / 2)
        exact = t.to(wide, copy=True)
        found[name] = exact.addcmul_(exact, d).to(t.dtype)
    return found


def run_graph(
    model: onnx.ModelProto,
    feeds: Mapping[str, torch.Tensor],
    dtype: torch.dtype = torch.float64,
    perturb_seed: int | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
    initializers: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The graph's outputs by name, every floating tensor computed in ``dtype``; with
    ``perturb_seed``, floating initializers perturbed by one rounding of their own dtype first
    (:func:`perturbed_initializers`); ``shapes``: filled with every value's shape on the way;
    ``initializers``: the graph's initializers as tensors (:func:`initializer_tensors`), read
    from the model when not given."""
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    tensors = dict(initializers) if initializers is not None else initializer_tensors(model)
    if perturb_seed is not None:
        tensors.update(perturbed_initializers(tensors, perturb_seed))
    env: dict[str, Any] = {"": None}
    for name, t in tensors.items():
        env[name] = t.to(dtype) if t.is_floating_point() else t
    for name, value in feeds.items():
        env[name] = value.to(dtype) if value.is_floating_point() else value
    for node in graph.node:
        fn = OPS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if fn is None:
            raise Unsupported(f"op {node.op_type}")
        try:
            outs = fn(node, [env[i] for i in node.input], _attrs(node), opset)
        except Unsupported:
            raise
        except Exception as e:  # a setting this table does not read: no exact run, rather than a crash
            raise Unsupported(f"op {node.op_type} ({first_line(e)})") from e
        for name, value in zip(node.output, outs, strict=False):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                value = value.to(dtype)  # every floating value in the run's dtype
            env[name] = value
            if shapes is not None and isinstance(value, torch.Tensor):
                shapes[name] = tuple(value.shape)
    return {o.name: env[o.name] for o in graph.output}


def exact_run(
    model: onnx.ModelProto,
    feeds: Mapping[str, torch.Tensor],
    limit_bytes: int | None = None,
    initializers: Mapping[str, torch.Tensor] | None = None,
) -> tuple[Any, str | None]:
    """``(outputs by name in float64, None)``, or ``(None, why)`` when the graph cannot run here or
    its float64 copy would exceed ``limit_bytes`` (the rule's ``exact_limit_bytes``)."""
    over = over_limit(model, limit_bytes)
    if over is not None:
        return None, over
    try:
        with torch.no_grad():
            return run_graph(model, feeds, initializers=initializers), None
    except Unsupported as e:
        return None, (
            f"no float64 reference ({e} is not computed by normfold's reference): the folded model is "
            "measured against the original's own onnxruntime run, by the floor alone"
        )


def perturbed_runs(model: onnx.ModelProto, feeds: Mapping[str, torch.Tensor], count: int) -> list[Any]:
    """``count`` float32 runs with perturbed initializers (module docstring)."""
    with torch.no_grad():
        return [run_graph(model, feeds, torch.float32, perturb_seed=k) for k in range(count)]


def over_limit(model: onnx.ModelProto, limit_bytes: int | None) -> str | None:
    """Why a float64 copy of ``model``'s initializers would exceed ``limit_bytes`` (the rule's
    ``exact_limit_bytes``), or None when it fits."""
    size = sum(8 * int(np.prod(i.dims)) for i in model.graph.initializer)
    if limit_bytes is None or size <= limit_bytes:
        return None
    return (
        f"no float64 reference: a float64 copy of the weights ({size / 2**30:.1f} GiB) exceeds the "
        "rule's exact_limit_bytes; the folded model is measured against the original's own run, by the "
        "floor alone"
    )

"""The tensors a plan reads from an ONNX model (:class:`normfold.engine.records.Values`), by
initializer name, and the names a new bias may not take."""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir
import torch

from normfold.engine import onnx_ops as ops
from normfold.engine.onnx_view import OnnxView


class _Taken(set):
    """Taken names: every ``<prefix>.bias`` too, so that a bias a fold creates is always named
    ``<weight>_folded_bias`` (ONNX weights need not be named ``<layer>.weight``: two weights
    ``a.w1`` and ``a.w2`` would both make ``a.bias``)."""

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name) or (isinstance(name, str) and name.rpartition(".")[2] == "bias")


class OnnxValues:
    """The tensors a plan reads (:class:`normfold.engine.records.Values`), by initializer name: as
    stored, except a Gemm's ``B`` and ``C``, read as ``alpha * B`` and ``beta * C`` (one value per
    output channel), the values its ``Y = A B + C`` takes once the applier writes alpha = beta = 1."""

    def __init__(self, view: OnnxView) -> None:
        self.view = view
        self.names: set[str] = _Taken(v.name for v in view.graph.initializers.values())
        for n in view.graph.all_nodes():
            self.names.update(v.name for v in (*n.inputs, *n.outputs) if v is not None and v.name)
        self.names.update(v.name for v in view.graph.inputs)
        self._scaled: dict[str, tuple[float, int | None]] = {}  # name -> (factor, expand to n)
        for node in view.graph:
            if view._op(node) != "Gemm" or view.layer(node) is None:
                continue
            alpha, beta = float(ops.attr(node, "alpha", 1.0)), float(ops.attr(node, "beta", 1.0))
            self._scaled[view.name(view.handle(node.inputs[1]))] = (alpha, None)
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                self._scaled[view.name(view.handle(node.inputs[2]))] = (beta, view.shape(node)[1])

    def value(self, fqn: str) -> torch.Tensor:
        return self.reader(fqn)()

    def reader(self, fqn: str) -> Callable[[], torch.Tensor]:
        """:meth:`value` as it reads now, to be read when called (after the model has changed):
        the stored tensor is captured, its data read only then."""
        handle = self.view.by_name[fqn]
        if isinstance(handle, ir.Value):
            source = handle.const_value

            def stored() -> torch.Tensor:
                return ops.as_tensor(source)
        else:  # a Constant node, or one computing a value from constants (cast once from float64)
            computed = self.view.constant(handle).to(self.view.dtype(handle))

            def stored() -> torch.Tensor:
                return computed
        factor, n = self._scaled.get(fqn, (1.0, None))
        if factor == 1.0 and n is None:
            return stored

        def scaled() -> torch.Tensor:
            t = stored()
            out = t.double() * factor
            return (out.reshape(-1).expand(n).clone() if n is not None else out).to(t.dtype)

        return scaled

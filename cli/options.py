"""The commands' options, grouped as the library takes them, parsed and checked without torch.

Each option is an ``Annotated`` type shared by the commands that take it (as onnxslim and
polygraphy group theirs: loading, inputs, the parity rule, export, output files). The parsers
turn their text into the library's option objects (:mod:`normfold.options`: ``LoadOptions``,
``InputSpec``, ``ExportOptions``, ``WriteOptions``; :class:`normfold.ParityRule`) and refuse a
malformed value with a :class:`~normfold.errors.UsageError` naming the flag, before torch is
imported. Two objects need torch to be built (an input dtype is a ``torch.dtype``, the parity
rule lives beside torch code): :class:`GivenInputs` and :class:`RuleOptions` hold the checked
text and build them once the command imports the library. :func:`grouped` makes them all from
a command's parameters, the one grouping every command uses.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from normfold.errors import UsageError
from normfold.options import ExportOptions, FoldOptions, InputSpec, LoadOptions, WriteOptions

if TYPE_CHECKING:
    from normfold.check.parity import ParityRule

#: ``--input-dtype`` choices: generated inputs are floating (integer ones need real values:
#: token ids below a vocabulary size, class labels... pass them with --inputs)
DTYPES = ("float32", "float16", "bfloat16", "float64")

# loading -------------------------------------------------------------------------------------------
ModelArg = Annotated[str, typer.Argument(
    help="A factory spec package.module:callable (e.g. normfold.models:resnet), a state_dict file "
    "(.pt/.pth/.bin/.safetensors, needs --model), a pickled nn.Module (needs --trust), or an ONNX model "
    "(fold and inspect: folded as a graph; no --model or --trust).",
    show_default=False, metavar="MODEL",
)]  # fmt: skip
ArchOpt = Annotated[str | None, typer.Option(
    "--model", metavar="SPEC", help="Factory spec that builds the architecture for a weights file."
)]  # fmt: skip
ArgsOpt = Annotated[
    str | None, typer.Option("--model-args", metavar="JSON", help="JSON object of factory keyword arguments.")
]
TrustOpt = Annotated[
    bool, typer.Option("--trust", help="Allow unpickling a whole nn.Module: this runs code from the file.")
]

# inputs --------------------------------------------------------------------------------------------
ShapeOpt = Annotated[list[str] | None, typer.Option(
    "--input-shape", metavar="[NAME:]SHAPE",
    help="Input shape like 1,3,224,224, or name:1,3,224,224 with the forward's argument name; one per "
    "input (default: the factory's; with --calibrate, the first batch's).",
)]  # fmt: skip
DtypeOpt = Annotated[str | None, typer.Option(
    "--input-dtype", metavar="DTYPE",
    help=f"Dtype of generated inputs: {', '.join(DTYPES)} (default: the weights'); integer inputs come "
    "from --inputs.",
)]  # fmt: skip
InputsOpt = Annotated[Path | None, typer.Option(
    "--inputs", metavar="FILE", help="torch.save file with a tensor or tuple of tensors (weights_only load)."
)]  # fmt: skip

# the parity rule -----------------------------------------------------------------------------------
RtolOpt = Annotated[
    float | None, typer.Option("--rtol", metavar="X", help="Override the relative tolerance floor.")
]
AtolOpt = Annotated[
    float | None, typer.Option("--atol", metavar="X", help="Override the absolute tolerance floor.")
]
NoiseOpt = Annotated[float, typer.Option(
    "--noise-factor", metavar="X",
    help="Allowed fold error, in multiples of the model's own rounding noise (vs float64).",
)]  # fmt: skip
RangeOpt = Annotated[str | None, typer.Option(
    "--value-range", metavar="LOW,HIGH", help="Range of the uniform parity inputs [default: 0,255]."
)]  # fmt: skip

# export --------------------------------------------------------------------------------------------
StaticOpt = Annotated[bool, typer.Option("--static-batch", help="Capture and export a fixed batch size.")]
DynamicOpt = Annotated[list[str] | None, typer.Option(
    "--dynamic", metavar="[INPUT:]AXIS=NAME,...",
    help="Keep more axes dynamic in the export, named (e.g. 2=height,3=width, or image:2=height for the "
    "forward argument image; INPUT defaults to the first); checked at a second size.",
)]  # fmt: skip
OpsetOpt = Annotated[
    int | None, typer.Option("--opset", metavar="N", help="ONNX opset (default: the exporter's).")
]
InputNamesOpt = Annotated[str | None, typer.Option(
    "--input-names", metavar="NAME,...",
    help="Names of the ONNX graph's inputs, one per input (default: the forward's argument names).",
)]  # fmt: skip
OutputNamesOpt = Annotated[str | None, typer.Option(
    "--output-names", metavar="NAME,...",
    help="Names of the ONNX graph's outputs, one per output (default: output, output_1, ...).",
)]  # fmt: skip
ProvidersOpt = Annotated[str | None, typer.Option(
    "--providers", metavar="EP,...",
    help="onnxruntime execution providers that check the written .onnx, each on its own (e.g. "
    "CUDAExecutionProvider,CPUExecutionProvider; default: CPUExecutionProvider).",
)]  # fmt: skip
LowerOpt = Annotated[str | None, typer.Option(
    "--lower-kept", metavar="mul-add|conv",
    help="Write every BatchNormalization left in the .onnx as Mul+Add (mul-add) or as a depthwise 1x1 "
    "Conv (conv), for runtimes without it; checked with the rest of the file (default: as is).",
)]  # fmt: skip

# what a run does and writes ------------------------------------------------------------------------
RequireOpt = Annotated[
    bool, typer.Option("--require-all", help="Exit 7, writing no model, when any norm is not folded.")
]
ReparamOpt = Annotated[bool, typer.Option(
    "--reparam/--no-reparam", help="Merge RepVGG-style parallel conv/BN/identity branches into one conv."
)]  # fmt: skip
CalibrateOpt = Annotated[Path | None, typer.Option(
    "--calibrate", metavar="FILE",
    help="Recalibrate BatchNorm statistics on these batches first (.pt); their shapes are the inputs' "
    "unless --input-shape or --inputs says otherwise.",
)]  # fmt: skip
DataOpt = Annotated[Path, typer.Option(
    "--data", metavar="FILE", help="torch.save'd list of batches (tensors or tuples of tensors)."
)]  # fmt: skip
FoldOutOpt = Annotated[Path, typer.Option("--out", "-o", metavar="FILE", help="Output file: .onnx or .pt2.")]
StateOutOpt = Annotated[
    Path, typer.Option("--out", "-o", metavar="FILE", help="Output state dict: .pt, .pth or .safetensors.")
]
AnyOutOpt = Annotated[Path, typer.Option(
    "--out", "-o", metavar="FILE", help="Output: .pt/.pth/.safetensors state dict, or .pt2/.onnx."
)]  # fmt: skip
ReportOpt = Annotated[Path | None, typer.Option(
    "--report", metavar="FILE",
    help="Write a JSON report here, also when the run fails (with the step and the error).",
)]  # fmt: skip
SaveInputsOpt = Annotated[Path | None, typer.Option(
    "--save-inputs", metavar="FILE",
    help="Save the parity inputs (.pt, {set: [tensors]}), also when the run fails.",
)]  # fmt: skip
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace existing output files.")]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="Print nothing but errors (no progress either).")
]


def shown(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def load_options(arch: str | None, model_args: str | None, trust: bool) -> LoadOptions:
    """``--model``, ``--model-args`` (JSON, checked) and ``--trust``."""
    from normfold.io.limits import parse_model_args

    return LoadOptions(model=arch, model_args=parse_model_args(model_args), trust=trust)


@dataclass(frozen=True)
class GivenInputs:
    """``--input-shape``, ``--input-dtype`` and ``--inputs``, checked; :meth:`spec` builds the
    :class:`~normfold.options.InputSpec` (it imports torch for the dtype)."""

    shapes: tuple[tuple[str | None, tuple[int, ...]], ...] = ()
    dtype: str | None = None
    file: Path | None = None

    def spec(self) -> InputSpec:
        import torch

        named = {name: dims for name, dims in self.shapes if name is not None}
        return InputSpec(
            shapes=named or [dims for _, dims in self.shapes] or None,
            dtype=getattr(torch, self.dtype) if self.dtype else None,
            file=self.file,
        )


def given_inputs(shapes: Sequence[str] | None, dtype: str | None, file: Path | None) -> GivenInputs:
    """The inputs' options, checked: one source of inputs, well-formed shapes within the size
    limit, a floating dtype."""
    from normfold.io.limits import check_size

    if file is not None and shapes:
        raise UsageError("pass either --inputs or --input-shape, not both")
    parsed = parse_shapes(shapes or [])
    check_size([dims for _, dims in parsed], " ".join(f"--input-shape {shown(t)}" for t in shapes or []))
    if dtype is not None and dtype not in DTYPES:
        hint = ""
        if re.fullmatch(r"u?int\d*|bool|long|short", dtype):
            hint = " (integer inputs need real values, e.g. token ids: pass them with --inputs FILE)"
        raise UsageError(f"--input-dtype {dtype!r}: choose one of {', '.join(DTYPES)}{hint}")
    return GivenInputs(tuple(parsed), dtype, file)


def parse_shapes(texts: Sequence[str]) -> list[tuple[str | None, tuple[int, ...]]]:
    """``--input-shape`` values: ``1,3,224,224`` in order, or ``name:1,3,224,224`` by the
    forward's argument names; all named or none, each name once."""
    parsed = []
    for text in texts:
        name, sep, dims = text.rpartition(":")
        if sep and not re.fullmatch(r"[A-Za-z_]\w*", name):
            raise UsageError(
                f"--input-shape {shown(text)!r}: {shown(name, 30)!r} is not an argument name "
                "(expected name:1,3,224,224 or 1,3,224,224)"
            )
        parsed.append((name or None, _parse_shape(text, dims)))
    names = [name for name, _ in parsed if name is not None]
    if names and len(names) != len(parsed):
        raise UsageError("--input-shape: name every shape (name:1,3,224,224) or none of them")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(f"--input-shape: {', '.join(repeated)} given more than once")
    return parsed


def _parse_shape(text: str, dims_text: str) -> tuple[int, ...]:
    """``1,3,224,224`` (or ``1x3x224x224``): positive integers, no empty field."""
    dims = []
    for i, f in enumerate((f.strip() for f in dims_text.replace("x", ",").split(",")), 1):
        problem = None
        if not f:
            problem = "is empty"
        elif not re.fullmatch(r"[+-]?[0-9]+", f):
            problem = f"({shown(f, 20)!r}) is not an integer"
        elif len(f) > 30:  # int() of a long digit string is slow; the size limit refuses it anyway
            problem = f"has {len(f):,} digits"
        elif int(f) <= 0:
            problem = f"is {int(f)}; dimensions must be positive"
        if problem is not None:
            raise UsageError(
                f"--input-shape {shown(text)!r}: dimension {i} {problem} "
                "(expected comma-separated positive integers like 1,3,224,224)"
            )
        dims.append(int(f))
    return tuple(dims)


def parse_dynamic(texts: Sequence[str]) -> dict[int | str, dict[int, str]]:
    """``--dynamic`` values: ``[INPUT:]AXIS=NAME,...`` (INPUT an argument name or a position,
    default the first input), as ``{input: {axis: name}}``; each axis and each name once."""
    out: dict[int | str, dict[int, str]] = {}
    seen: set[str] = set()
    for text in texts:
        found = re.fullmatch(r"(?:(\w+):)?(\d+=[A-Za-z_]\w*(?:,\d+=[A-Za-z_]\w*)*)", text.replace(" ", ""))
        if found is None:
            raise UsageError(
                f"--dynamic {shown(text)!r}: expected [INPUT:]AXIS=NAME,... like 2=height,3=width "
                "or image:2=height"
            )
        key: int | str = found.group(1) or 0
        key = int(key) if isinstance(key, str) and key.isdigit() else key
        for pair in found.group(2).split(","):
            axis, name = pair.split("=")
            if int(axis) in out.get(key, {}) or name in seen:
                raise UsageError(f"--dynamic {shown(text)!r}: axis {axis} or name {name} given twice")
            out.setdefault(key, {})[int(axis)] = name
            seen.add(name)
    return out


def parse_list(flag: str, text: str | None) -> tuple[str, ...] | None:
    """A comma-separated value (``--input-names image,features``): its items, none empty."""
    if text is None:
        return None
    items = tuple(item.strip() for item in text.split(","))
    empty = next((i for i, item in enumerate(items, 1) if not item), None)
    if empty is not None:
        raise UsageError(f"{flag} {shown(text)!r}: item {empty} is empty (expected comma-separated names)")
    return items


def export_options(
    *,
    opset: int | None = None,
    static_batch: bool = False,
    dynamic: Sequence[str] | None = None,
    input_names: str | None = None,
    output_names: str | None = None,
    providers: str | None = None,
    lower_kept: str | None = None,
) -> ExportOptions:
    """The export's options; the opset range and the providers installed are pre-flight's
    (:mod:`normfold.cli.preflight`: they need onnx / onnxruntime)."""
    return ExportOptions(
        opset=opset,
        static_batch=static_batch,
        dynamic_axes=parse_dynamic(dynamic or []) or None,
        input_names=parse_list("--input-names", input_names),
        output_names=parse_list("--output-names", output_names),
        providers=parse_list("--providers", providers),
        lower_kept=lower_kept,
    )


@dataclass(frozen=True)
class RuleOptions:
    """``--rtol``, ``--atol``, ``--noise-factor``, ``--value-range``, checked; :meth:`rule`
    builds the :class:`normfold.ParityRule` (its module imports torch)."""

    rtol: float | None
    atol: float | None
    noise_factor: float
    value_range: tuple[float, float]

    def rule(self) -> ParityRule:
        from normfold.check.parity import ParityRule

        return ParityRule(
            rtol=self.rtol, atol=self.atol, noise_factor=self.noise_factor, value_range=self.value_range
        )


def rule_options(
    rtol: float | None, atol: float | None, noise_factor: float, value_range: str | None
) -> RuleOptions:
    """The parity rule's options, checked: finite non-negative numbers, a range LOW < HIGH."""
    for name, value in (("--rtol", rtol), ("--atol", atol), ("--noise-factor", noise_factor)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UsageError(f"{name} must be finite and >= 0, got {value}")
    low_high = (0.0, 255.0)
    if value_range is not None:
        try:
            low, high = (float(v) for v in value_range.split(","))
        except ValueError as e:
            raise UsageError(f"--value-range {value_range!r}: expected two numbers like 0,255") from e
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise UsageError(f"--value-range {value_range!r}: expected finite LOW,HIGH with LOW < HIGH")
        low_high = (low, high)
    return RuleOptions(rtol, atol, noise_factor, low_high)


@dataclass(frozen=True)
class Grouped:
    """One command's options in the library's objects; an option the command does not take keeps
    its default (the library's, or the CLI's for ``--reparam`` and ``--noise-factor``)."""

    load: LoadOptions
    given: GivenInputs
    rule: RuleOptions
    folding: FoldOptions
    export: ExportOptions
    write: WriteOptions


def grouped(params: Mapping[str, Any]) -> Grouped:
    """A command's parameters (its ``locals()`` on entry: typer names each after its option,
    ``arch`` for ``--model``), checked and grouped. The checks run in one order for every command
    (loading, inputs, the parity rule, export, output files), so the first malformed option is
    the one reported."""
    p = params.get
    load = load_options(p("arch"), p("model_args"), p("trust", False))
    given = given_inputs(p("input_shape"), p("input_dtype"), p("inputs"))
    rule = rule_options(p("rtol"), p("atol"), p("noise_factor", 4.0), p("value_range"))
    folding = FoldOptions(
        reparameterize=p("reparam", True), calibrate=p("calibrate"), require_all=p("require_all", False)
    )
    export = export_options(
        opset=p("opset"), static_batch=p("static_batch", False), dynamic=p("dynamic"),
        input_names=p("input_names"), output_names=p("output_names"), providers=p("providers"),
        lower_kept=p("lower_kept"),
    )  # fmt: skip
    write = WriteOptions(report=p("report"), save_inputs=p("save_inputs"), force=p("force", False))
    return Grouped(load, given, rule, folding, export, write)


#: ``fold``/``inspect`` options that mean nothing for an ONNX model (parameter -> flag, why):
#: refused by name rather than ignored
NOT_FOR_ONNX = {
    "arch": ("--model", "the graph is its own architecture"),
    "model_args": ("--model-args", "the graph is its own architecture"),
    "trust": ("--trust", "an ONNX file is data, read without running code from it"),
    "input_dtype": ("--input-dtype", "the graph declares its inputs' types"),
    "static_batch": ("--static-batch", "the folded file keeps the original's input shapes"),
    "dynamic": (
        "--dynamic",
        "the folded file keeps the original's input shapes; give sizes to symbolic dims with --input-shape",
    ),
    "opset": ("--opset", "the folded file keeps the original's opset imports"),
    "input_names": ("--input-names", "the folded file keeps the original's input and output names"),
    "output_names": ("--output-names", "the folded file keeps the original's input and output names"),
    "calibrate": ("--calibrate", "recalibrating BatchNorm statistics needs the PyTorch model"),
}


def refuse_for_onnx(params: Mapping[str, Any], source: str) -> None:
    """A command's parameters for an ONNX model: each option of :data:`NOT_FOR_ONNX` given is a
    usage error naming it (a switch counts when on; ``--reparam`` is accepted: an ONNX graph has
    no branch merges to make or skip)."""
    for name, (flag, why) in NOT_FOR_ONNX.items():
        if params.get(name) not in (None, False):
            raise UsageError(f"{source} is an ONNX model: {flag} does not apply to it ({why})")

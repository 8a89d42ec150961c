"""``normfold recalibrate``, ``drop-bias`` and ``swap``: the commands that write a transformed
model. Each groups its options into the library's option objects
(:func:`normfold.cli.options.grouped`), checks what can be checked before torch loads, makes one
library call (:func:`normfold.pipeline.recalibrate_and_write`,
:func:`~normfold.pipeline.drop_bias_and_write`, :func:`~normfold.pipeline.swap_and_write`) and
renders it."""

from __future__ import annotations

from typing import Annotated

import typer
from normfold.cli import preflight, render
from normfold.cli.errors import guard
from normfold.cli.options import (
    AnyOutOpt,
    ArchOpt,
    ArgsOpt,
    DataOpt,
    DtypeOpt,
    DynamicOpt,
    ForceOpt,
    InputNamesOpt,
    InputsOpt,
    ModelArg,
    OpsetOpt,
    OutputNamesOpt,
    ProvidersOpt,
    QuietOpt,
    ReportOpt,
    ShapeOpt,
    StateOutOpt,
    StaticOpt,
    TrustOpt,
    grouped,
)  # fmt: skip
from normfold.cli.progress import progress

from normfold.io.files import ANY_FORMATS, STATE_FORMATS

RECALIBRATE_EXAMPLES = """Examples:

\b
  normfold recalibrate normfold.models:resnet --data batches.pt --out recalibrated.safetensors
  normfold recalibrate weights.pt --model torchvision.models:resnet50 --data batches.pt --out r50.pt \\
      --report recalibrate.json
"""

DROP_BIAS_EXAMPLES = """Examples:

\b
  normfold drop-bias normfold.models:mlp --out mlp.safetensors
  normfold drop-bias weights.pt --model torchvision.models:resnet50 --input-shape 1,3,224,224 --out r50.onnx
  normfold drop-bias normfold.models:resnet --out r.onnx --static-batch --opset 18 --output-names logits
"""

SWAP_EXAMPLES = """Examples:

\b
  normfold swap normfold.models:resnet --to group --num-groups 4 --out resnet_gn.pt
  normfold swap weights.pt --model mypkg.nets:build --to frozen --input-shape 1,3,64,64 --out frozen.onnx
  normfold swap normfold.models:resnet --to layer --out resnet_ln.onnx --dynamic 2=height,3=width
"""

ToOpt = Annotated[str, typer.Option(
    "--to", metavar="KIND", help="group, layer, frozen or batch (SyncBatchNorm -> BatchNorm)."
)]  # fmt: skip
NumGroupsOpt = Annotated[int | None, typer.Option("--num-groups", metavar="N", help="GroupNorm groups.")]
GroupSizeOpt = Annotated[
    int | None, typer.Option("--group-size", metavar="N", help="GroupNorm channels per group.")
]


def recalibrate_cmd(
    model: ModelArg,
    data: DataOpt,
    out: StateOutOpt,
    arch: ArchOpt = None,
    model_args: ArgsOpt = None,
    trust: TrustOpt = False,
    force: ForceOpt = False,
    report: ReportOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Replace BatchNorm running statistics by the exact eval-mode statistics on --data; write OUT."""
    with guard():
        opts = grouped(locals())
        preflight.check(model, out, load=opts.load, write=opts.write, formats={"out": STATE_FORMATS},
                        tensor_files={"data": data})  # fmt: skip
        with progress("recalibrate", quiet=quiet) as on_step:
            from normfold import pipeline

            run = pipeline.recalibrate_and_write(
                model, data, out, load=opts.load, write=opts.write, on_step=on_step
            )
        if not quiet:
            render.recalibrated(run)


def drop_bias_cmd(
    model: ModelArg,
    out: AnyOutOpt,
    arch: ArchOpt = None,
    model_args: ArgsOpt = None,
    trust: TrustOpt = False,
    input_shape: ShapeOpt = None,
    input_dtype: DtypeOpt = None,
    inputs: InputsOpt = None,
    static_batch: StaticOpt = False,
    dynamic: DynamicOpt = None,
    opset: OpsetOpt = None,
    input_names: InputNamesOpt = None,
    output_names: OutputNamesOpt = None,
    providers: ProvidersOpt = None,
    force: ForceOpt = False,
    report: ReportOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Remove Conv/Linear biases a BatchNorm makes redundant (outputs unchanged); write OUT."""
    with guard():
        opts = grouped(locals())
        preflight.check(
            model, out, load=opts.load, write=opts.write, export=opts.export, formats={"out": ANY_FORMATS},
            tensor_files={"inputs": inputs},
        )  # fmt: skip
        with progress("drop-bias", quiet=quiet) as on_step:
            from normfold import pipeline

            run = pipeline.drop_bias_and_write(
                model, out, inputs=opts.given.spec(), load=opts.load, export=opts.export, write=opts.write,
                on_step=on_step,
            )  # fmt: skip
        if not quiet:
            render.dropped(run)


def swap_cmd(
    model: ModelArg,
    out: AnyOutOpt,
    to: ToOpt,
    num_groups: NumGroupsOpt = None,
    group_size: GroupSizeOpt = None,
    arch: ArchOpt = None,
    model_args: ArgsOpt = None,
    trust: TrustOpt = False,
    input_shape: ShapeOpt = None,
    input_dtype: DtypeOpt = None,
    inputs: InputsOpt = None,
    static_batch: StaticOpt = False,
    dynamic: DynamicOpt = None,
    opset: OpsetOpt = None,
    input_names: InputNamesOpt = None,
    output_names: OutputNamesOpt = None,
    providers: ProvidersOpt = None,
    force: ForceOpt = False,
    report: ReportOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Swap BatchNorm for GroupNorm / LayerNorm / frozen BN, or SyncBatchNorm for BatchNorm; write OUT."""
    with guard():
        opts = grouped(locals())
        preflight.check(
            model, out, load=opts.load, write=opts.write, export=opts.export, formats={"out": ANY_FORMATS},
            tensor_files={"inputs": inputs},
        )  # fmt: skip
        with progress("swap", quiet=quiet) as on_step:
            from normfold import pipeline

            run = pipeline.swap_and_write(
                model, out, to, num_groups=num_groups, group_size=group_size, inputs=opts.given.spec(),
                load=opts.load, export=opts.export, write=opts.write, on_step=on_step,
            )  # fmt: skip
        if not quiet:
            render.swapped(run, to)

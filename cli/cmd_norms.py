"""``normfold fold-norms``: the scale and shift of every LayerNorm / RMSNorm / GroupNorm into the
Linear layers it feeds (:func:`normfold.fold_norm_affine`), written as a state dict or an export.

One library call (:func:`normfold.pipeline.fold_norms_and_write`); the norms stay in the model,
parameter-free, so a ``.safetensors``/``.pt`` output loads into the user's own class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from normfold.cli import preflight, render
from normfold.cli.errors import guard
from normfold.cli.options import (
    AnyOutOpt,
    ArchOpt,
    ArgsOpt,
    DtypeOpt,
    DynamicOpt,
    ForceOpt,
    Grouped,
    InputNamesOpt,
    InputsOpt,
    ModelArg,
    OpsetOpt,
    OutputNamesOpt,
    ProvidersOpt,
    QuietOpt,
    ReportOpt,
    ShapeOpt,
    StaticOpt,
    TrustOpt,
    grouped,
)  # fmt: skip
from normfold.cli.progress import progress

from normfold.io.files import ANY_FORMATS

FOLD_NORMS_EXAMPLES = """Examples:

\b
  normfold fold-norms weights.pt --model mypkg.nets:build --input-shape 2,16,64 --out folded.safetensors
  normfold fold-norms ckpt_dir --model mypkg.nets:build --inputs ids.pt --out folded_dir
  normfold fold-norms weights.pt --model mypkg.nets:build --input-shape 2,16,64 --out m.onnx --untie
"""

NewBiasesOpt = Annotated[bool, typer.Option(
    "--new-biases",
    help="Give an nn.Linear without a bias a new one for the norm's shift (default: the shift stays in "
    "the norm, code new_bias_needed, so the weights load into the original class).",
)]  # fmt: skip
UntieOpt = Annotated[bool, typer.Option(
    "--untie",
    help="Give a consumer weight tied to another (an LM head and its embedding) its own copy and fold "
    "it (default: refused, code tied_weight).",
)]  # fmt: skip


def fold_norms_cmd(
    model: ModelArg,
    out: AnyOutOpt,
    new_biases: NewBiasesOpt = False,
    untie: UntieOpt = False,
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
    """Fold LayerNorm/RMSNorm/GroupNorm scales and shifts into the Linear layers they feed; write OUT."""
    with guard():
        params = dict(locals())
        opts = grouped(params)
        if Path(model).is_dir():  # a (sharded) safetensors checkpoint folder: folded shard by shard
            given = [flag for flag, name in _EXPORT_ONLY.items() if params[name] not in (None, False)]
            _checkpoint(model, out, opts, new_biases=new_biases, untie=untie, quiet=quiet, export_given=given)
            return
        preflight.check(
            model, out, load=opts.load, write=opts.write, export=opts.export, formats={"out": ANY_FORMATS},
            tensor_files={"inputs": inputs},
        )  # fmt: skip
        with progress("fold-norms", quiet=quiet) as on_step:
            from normfold import pipeline

            run = pipeline.fold_norms_and_write(
                model, out, new_biases=new_biases, untie=untie, inputs=opts.given.spec(), load=opts.load,
                export=opts.export, write=opts.write, on_step=on_step,
            )  # fmt: skip
        if not quiet:
            render.norms_folded(run)


#: options that only mean something for an export (``--out`` a file)
_EXPORT_ONLY = {"--static-batch": "static_batch", "--dynamic": "dynamic", "--opset": "opset",
                "--input-names": "input_names", "--output-names": "output_names",
                "--providers": "providers"}  # fmt: skip


def _checkpoint(
    model: str,
    out: Path,
    opts: Grouped,
    *,
    new_biases: bool,
    untie: bool,
    quiet: bool,
    export_given: list[str],
) -> None:
    """MODEL is a checkpoint folder (``model.safetensors`` or shards and their index): OUT is the
    folder the folded checkpoint goes to (:func:`normfold.fold_norm_affine_checkpoint`)."""
    from normfold.errors import UsageError

    if export_given:
        raise UsageError(f"{', '.join(export_given)}: only for an export; a checkpoint folder is written "
                         "as a checkpoint folder")  # fmt: skip
    if opts.load.model is None:  # the library says model=; the CLI names its own flag
        raise UsageError(f"{model} is a checkpoint folder: give its architecture with --model "
                         "package.module:callable (built on the meta device, without weights)")  # fmt: skip
    with progress("fold-norms", quiet=quiet):
        from normfold.norm_checkpoint_run import fold_norm_checkpoint_and_write

        result = fold_norm_checkpoint_and_write(
            model, out, new_biases=new_biases, untie=untie, inputs=opts.given.spec(), load=opts.load,
            write=opts.write,
        )  # fmt: skip
    if not quiet:
        render.checkpoint_folded(result)

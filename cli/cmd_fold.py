"""``normfold fold`` and ``normfold inspect``: each groups its options into the library's option
objects (:func:`normfold.cli.options.grouped`), checks what can be checked before torch loads,
makes one library call (:func:`normfold.pipeline.fold_and_export`, :func:`normfold.pipeline.inspect`;
for an ONNX model, :func:`normfold.onnx_pipeline.fold_onnx_file`, :func:`normfold.onnx_pipeline.inspect_onnx`,
refusing by name the options that need a PyTorch model) and renders it."""

from __future__ import annotations

import time

from normfold.cli import preflight, render
from normfold.cli.errors import guard
from normfold.cli.options import (
    ArchOpt,
    ArgsOpt,
    AtolOpt,
    CalibrateOpt,
    DtypeOpt,
    DynamicOpt,
    FoldOutOpt,
    ForceOpt,
    InputNamesOpt,
    InputsOpt,
    LowerOpt,
    ModelArg,
    NoiseOpt,
    OpsetOpt,
    OutputNamesOpt,
    ProvidersOpt,
    QuietOpt,
    RangeOpt,
    ReparamOpt,
    ReportOpt,
    RequireOpt,
    RtolOpt,
    SaveInputsOpt,
    ShapeOpt,
    StaticOpt,
    TrustOpt,
    grouped,
    refuse_for_onnx,
)  # fmt: skip
from normfold.cli.progress import progress

from normfold.io.files import MODEL_FORMATS

FOLD_EXAMPLES = """Examples:

\b
  normfold fold normfold.models:resnet --out resnet.onnx
  normfold fold weights.pt --model torchvision.models:resnet50 --input-shape 1,3,224,224 --out r50.onnx
  normfold fold timm:create_model --model-args '{"model_name": "resnet50"}' \\
      --input-shape 1,3,224,224 --out r50.onnx --require-all --report r50.json
  normfold fold weights.pt --model mypkg.nets:build --calibrate batches.pt --out m.onnx
  normfold fold normfold.models:two_tower --input-shape image:1,3,24,24 --input-shape features:1,12 \\
      --dynamic image:2=height,3=width --input-names image,features --output-names logits --out two.onnx
  normfold fold normfold.models:resnet --out r.onnx --providers CUDAExecutionProvider,CPUExecutionProvider
  normfold fold model.onnx --out folded.onnx --input-shape 1,3,224,224 --report folded.json
"""

INSPECT_EXAMPLES = """Examples:

\b
  normfold inspect normfold.models:mixed
  normfold inspect weights.safetensors --model mypkg.nets:build --input-shape image:1,3,64,64 --require-all
  normfold inspect normfold.models:repvgg --no-reparam --report repvgg.json
  normfold inspect model.onnx --require-all
"""


def fold_cmd(
    model: ModelArg,
    out: FoldOutOpt,
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
    lower_kept: LowerOpt = None,
    force: ForceOpt = False,
    rtol: RtolOpt = None,
    atol: AtolOpt = None,
    noise_factor: NoiseOpt = 4.0,
    value_range: RangeOpt = None,
    calibrate: CalibrateOpt = None,
    require_all: RequireOpt = False,
    reparam: ReparamOpt = True,
    report: ReportOpt = None,
    save_inputs: SaveInputsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Load -> fold -> verify in PyTorch -> export -> verify in onnxruntime -> write OUT.
    An ONNX model (MODEL.onnx): load -> fold -> verify in onnxruntime against it -> write OUT."""
    started = time.perf_counter()
    params = dict(locals())
    with guard():
        opts = grouped(params)
        if preflight.is_onnx(model):
            refuse_for_onnx(params, model)
            preflight.check(
                model, out, write=opts.write, formats={"out": (".onnx",), "save_inputs": (".pt",)},
                tensor_files={"inputs": inputs}, onnx=True, export=opts.export,
            )  # fmt: skip
            with progress("fold", quiet=quiet) as on_step:
                from normfold.onnx_pipeline import fold_onnx_file

                run = fold_onnx_file(
                    model, out, inputs=opts.given.spec(), folding=opts.folding, rule=opts.rule.rule(),
                    export=opts.export, write=opts.write, on_step=on_step,
                )  # fmt: skip
        else:
            preflight.check(
                model, out, load=opts.load, write=opts.write, export=opts.export,
                formats={"out": MODEL_FORMATS, "save_inputs": (".pt",)},
                tensor_files={"inputs": inputs, "data": calibrate},
            )  # fmt: skip
            with progress("fold", quiet=quiet) as on_step:
                from normfold import pipeline

                run = pipeline.fold_and_export(
                    model, out, inputs=opts.given.spec(), load=opts.load, folding=opts.folding,
                    rule=opts.rule.rule(), export=opts.export, write=opts.write, on_step=on_step,
                )  # fmt: skip
        if not quiet:
            render.layers(run)
            render.parity(run)
            render.error_stats(run)
            render.written(run, elapsed=time.perf_counter() - started)
            render.line(render.result_line(run))


def inspect_cmd(
    model: ModelArg,
    arch: ArchOpt = None,
    model_args: ArgsOpt = None,
    trust: TrustOpt = False,
    input_shape: ShapeOpt = None,
    input_dtype: DtypeOpt = None,
    inputs: InputsOpt = None,
    static_batch: StaticOpt = False,
    dynamic: DynamicOpt = None,
    require_all: RequireOpt = False,
    reparam: ReparamOpt = True,
    report: ReportOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Dry run: every norm layer, what it would fold into or why it stays (fold's own decisions,
    on the same inputs). Writes no model. MODEL may be an ONNX model (MODEL.onnx)."""
    params = dict(locals())
    with guard():
        opts = grouped(params)
        onnx = preflight.is_onnx(model)
        if onnx:
            refuse_for_onnx(params, model)
        preflight.check(
            model, None, load=opts.load, write=opts.write, formats={}, tensor_files={"inputs": inputs},
            onnx=onnx,
        )  # fmt: skip
        with progress("inspect", quiet=quiet) as on_step:
            if onnx:
                from normfold.onnx_pipeline import inspect_onnx

                run = inspect_onnx(
                    model, inputs=opts.given.spec(), folding=opts.folding, write=opts.write, on_step=on_step
                )
            else:
                from normfold import pipeline

                run = pipeline.inspect(
                    model, inputs=opts.given.spec(), load=opts.load, folding=opts.folding,
                    export=opts.export, write=opts.write, on_step=on_step,
                )  # fmt: skip
        if not quiet:
            render.layers(run)
            render.inspect_summary(run)
            render.line(render.result_line(run))

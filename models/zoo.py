"""Reference model zoo: small, deterministic models that exercise every fold pattern.

Each factory builds a tiny model in eval mode whose BatchNorms carry *realistic* state: running
statistics measured on real (shifted, scaled) batches rather than the ``0``/``1`` defaults, and
randomized affine parameters. With default statistics every BatchNorm is nearly the identity and a
broken fold would still pass a parity check; with these it cannot.

Factories are keyword-only, seeded and side-effect free: the same ``seed`` gives a byte-identical
``state_dict`` and the caller's global RNG state is left untouched. Their names match the
:data:`ZOO` registry, so ``"normfold.models:<name>"`` works as a factory spec, and
:func:`example_inputs` gives seeded inputs of each entry's ``input_shape``. Importing this module
registers every factory's input shapes (:func:`normfold.io.factory.register_input_shapes`), so a
spec without inputs runs on them.

The models live by concern: plain CNNs and MLPs (:mod:`~normfold.models.cnns`), norms whose place
decides the fold (:mod:`~normfold.models.patterns`), token models (:mod:`~normfold.models.token_models`),
hand-written layers (:mod:`~normfold.models.handwritten`), multi-branch blocks
(:mod:`~normfold.models.reparam_blocks`); their state comes from :mod:`~normfold.models.calibration`.
Every name stays importable from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from normfold.io.factory import register_input_shapes

from .calibration import (
    CALIBRATION_BATCH,
    CALIBRATION_PASSES,
    build_calibrated,
    calibrate,
    measure_functional_batch_norms,
    random_input,
)
from .cnns import MLP, AudioCNN, BasicBlock, Decoder, InvertedResidual, MobileNet, ResNet, TwoTower, VideoCNN
from .handwritten import (
    BatchNormAct2d,
    BNAct,
    Conv2dSame,
    CustomBN,
    CustomNorm2d,
    Functional,
    SamePad,
    calibrate_custom_norms,
)
from .patterns import BNHead, MixConv, Mixed, MixedKernel
from .reparam_blocks import ACBlock, ACNet, MobileOne, MobileOneBlock, RepVGG, RepVGGBlock, conv_bn
from .token_models import (
    InceptionDWConv2d,
    InceptionNeXt,
    LeViT,
    LeViTAttention,
    LeViTMlp,
    LinearNorm,
    MetaNeXtBlock,
)

_conv_bn = conv_bn  # its old name (tests build blocks with it)

__all__ = [
    "CALIBRATION_BATCH",
    "CALIBRATION_PASSES",
    "MLP",
    "ZOO",
    "ACBlock",
    "ACNet",
    "AudioCNN",
    "BNAct",
    "BNHead",
    "BasicBlock",
    "BatchNormAct2d",
    "Conv2dSame",
    "CustomBN",
    "CustomNorm2d",
    "Decoder",
    "Functional",
    "InceptionDWConv2d",
    "InceptionNeXt",
    "InvertedResidual",
    "LeViT",
    "LeViTAttention",
    "LeViTMlp",
    "LinearNorm",
    "MetaNeXtBlock",
    "MixConv",
    "Mixed",
    "MixedKernel",
    "MobileNet",
    "MobileOne",
    "MobileOneBlock",
    "RepVGG",
    "RepVGGBlock",
    "ResNet",
    "SamePad",
    "TwoTower",
    "VideoCNN",
    "ZooModel",
    "acnet",
    "audio_cnn",
    "bn_act",
    "bn_head",
    "calibrate",
    "custom_bn",
    "decoder",
    "example_inputs",
    "functional",
    "inception_next",
    "levit",
    "mixed",
    "mixed_kernel",
    "mlp",
    "mobilenet",
    "mobileone",
    "repvgg",
    "resnet",
    "same_pad",
    "spec_of",
    "two_tower",
    "video_cnn",
]

M = TypeVar("M", bound=nn.Module)


def _build(
    name: str,
    seed: int,
    make: Callable[[], M],
    post: Callable[[M, tuple[int, ...], torch.Generator], None] | None = None,
) -> M:
    """:func:`~normfold.models.calibration.build_calibrated` on zoo entry ``name``'s input shapes."""
    return build_calibrated(ZOO[name].input_shapes, seed, make, post)


# --------------------------------------------------------------------------------------------
# factories (names match the ZOO keys, so "normfold.models:<name>" is a valid factory spec)


def resnet(*, seed: int = 0, num_classes: int = 10) -> ResNet:
    """ResNet-style CNN for ``(N, 3, 32, 32)`` images."""
    return _build("resnet", seed, lambda: ResNet(num_classes))


def mobilenet(*, seed: int = 0, num_classes: int = 10) -> MobileNet:
    """MobileNetV2-style CNN for ``(N, 3, 32, 32)`` images."""
    return _build("mobilenet", seed, lambda: MobileNet(num_classes))


def mlp(*, seed: int = 0, num_classes: int = 10) -> MLP:
    """Linear-BatchNorm1d MLP for ``(N, 64)`` features."""
    return _build("mlp", seed, lambda: MLP(64, num_classes))


def audio_cnn(*, seed: int = 0, num_classes: int = 10) -> AudioCNN:
    """1-D CNN for ``(N, 1, 400)`` waveforms."""
    return _build("audio_cnn", seed, lambda: AudioCNN(num_classes))


def video_cnn(*, seed: int = 0, num_classes: int = 10) -> VideoCNN:
    """3-D CNN for ``(N, 3, 4, 16, 16)`` clips."""
    return _build("video_cnn", seed, lambda: VideoCNN(num_classes))


def decoder(*, seed: int = 0, out_channels: int = 3) -> Decoder:
    """ConvTranspose2d upsampler, ``(N, 16, 4, 4) -> (N, out_channels, 16, 16)``."""
    return _build("decoder", seed, lambda: Decoder(16, out_channels))


def mixed(*, seed: int = 0, num_classes: int = 10) -> Mixed:
    """Foldable and non-foldable norms side by side (see :class:`Mixed`)."""
    return _build("mixed", seed, lambda: Mixed(num_classes))


def levit(*, seed: int = 0, num_classes: int = 10) -> LeViT:
    """LeViT-style token model for ``(N, 3, 32, 32)`` images (see :class:`LeViT`)."""
    return _build("levit", seed, lambda: LeViT(num_classes))


def inception_next(*, seed: int = 0, num_classes: int = 10) -> InceptionNeXt:
    """InceptionNeXt-style CNN for ``(N, 3, 32, 32)`` images (see :class:`InceptionNeXt`)."""
    return _build("inception_next", seed, lambda: InceptionNeXt(num_classes))


def bn_head(*, seed: int = 0, num_classes: int = 10) -> BNHead:
    """CNN with a BatchNorm before pooling and the Linear head (see :class:`BNHead`)."""
    return _build("bn_head", seed, lambda: BNHead(num_classes))


def two_tower(*, seed: int = 0, num_classes: int = 10) -> TwoTower:
    """Two-input model for ``image (N, 3, 24, 24)`` and ``features (N, 12)``."""
    return _build("two_tower", seed, lambda: TwoTower(num_classes=num_classes))


def same_pad(*, seed: int = 0, num_classes: int = 10) -> SamePad:
    """Run-time ``SAME`` padding convs, not fx-traceable (see :class:`SamePad`)."""
    return _build("same_pad", seed, lambda: SamePad(num_classes))


def functional(*, seed: int = 0, num_classes: int = 10) -> Functional:
    """Conv/BN/Linear written as functional calls on module parameters (see :class:`Functional`)."""
    return _build("functional", seed, lambda: Functional(num_classes), post=measure_functional_batch_norms)


def bn_act(*, seed: int = 0, num_classes: int = 10) -> BNAct:
    """CNN whose norms are timm-style ``BatchNormAct2d`` (see :class:`BNAct`)."""
    return _build("bn_act", seed, lambda: BNAct(num_classes))


def custom_bn(*, seed: int = 0, num_classes: int = 10) -> CustomBN:
    """Hand-written norms: a non-``_BatchNorm`` module and an inline one (see :class:`CustomBN`)."""
    return _build("custom_bn", seed, lambda: CustomBN(num_classes), post=calibrate_custom_norms)


def mixed_kernel(*, seed: int = 0, num_classes: int = 10) -> MixedKernel:
    """MixConv and multi-branch concatenations under one BatchNorm (see :class:`MixedKernel`)."""
    return _build("mixed_kernel", seed, lambda: MixedKernel(num_classes))


def repvgg(*, seed: int = 0, num_classes: int = 10) -> RepVGG:
    """RepVGG-style CNN of training-time blocks (see :class:`RepVGGBlock`)."""
    return _build("repvgg", seed, lambda: RepVGG(num_classes))


def mobileone(*, seed: int = 0, num_classes: int = 10) -> MobileOne:
    """MobileOne-style CNN of training-time blocks (see :class:`MobileOneBlock`)."""
    return _build("mobileone", seed, lambda: MobileOne(num_classes))


def acnet(*, seed: int = 0, num_classes: int = 10) -> ACNet:
    """ACNet-style CNN of asymmetric convolution blocks (see :class:`ACBlock`)."""
    return _build("acnet", seed, lambda: ACNet(num_classes))


# --------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry: a factory plus the shape of an example input (batch first)."""

    name: str
    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    description: str
    more_inputs: tuple[tuple[int, ...], ...] = ()  # the shapes of further positional inputs

    @property
    def input_shapes(self) -> tuple[tuple[int, ...], ...]:
        return (self.input_shape, *self.more_inputs)


ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel(
            "resnet", resnet, (2, 3, 32, 32), "ResNet-style CNN: conv-bn pairs, strided block, 1x1 shortcut"
        ),
        ZooModel(
            "mobilenet",
            mobilenet,
            (2, 3, 32, 32),
            "MobileNetV2-style: depthwise, grouped, dilated and reflect-padded convs",
        ),
        ZooModel("mlp", mlp, (4, 64), "Linear-BatchNorm1d MLP, one Linear without bias"),
        ZooModel("audio_cnn", audio_cnn, (2, 1, 400), "1-D CNN: strided Conv1d-BatchNorm1d blocks"),
        ZooModel("video_cnn", video_cnn, (2, 3, 4, 16, 16), "3-D CNN: Conv3d-BatchNorm3d blocks"),
        ZooModel(
            "decoder",
            decoder,
            (2, 16, 4, 4),
            "ConvTranspose2d upsampler: output_padding, grouped, depthwise, dilated",
        ),
        ZooModel("mixed", mixed, (2, 8, 8, 8), "foldable and non-foldable norms side by side"),
        ZooModel(
            "levit",
            levit,
            (2, 3, 32, 32),
            "LeViT-style tokens: Linear-BatchNorm1d through flatten/reshape, BatchNorm1d-Linear head",
        ),
        ZooModel(
            "inception_next",
            inception_next,
            (2, 3, 32, 32),
            "InceptionNeXt-style: BatchNorm2d before a 1x1 conv after a split/concat token mixer",
        ),
        ZooModel(
            "bn_head", bn_head, (2, 3, 32, 32), "BatchNorm2d before pooling, flatten and the Linear head"
        ),
        ZooModel(
            "same_pad",
            same_pad,
            (2, 3, 32, 32),
            "timm Conv2dSame: shape-dependent padding in forward, not fx-traceable",
        ),
        ZooModel(
            "functional",
            functional,
            (2, 3, 32, 32),
            "F.conv2d / F.batch_norm / F.linear on module parameters, no module calls",
        ),
        ZooModel(
            "bn_act",
            bn_act,
            (2, 3, 32, 32),
            "timm BatchNormAct2d: a BatchNorm2d subclass with built-in dropout and activation",
        ),
        ZooModel(
            "custom_bn",
            custom_bn,
            (2, 3, 32, 32),
            "hand-written norms: a non-_BatchNorm module and an inline gain*(h-mean)/std+bias",
        ),
        ZooModel(
            "mixed_kernel",
            mixed_kernel,
            (2, 3, 32, 32),
            "MixConv split/concat and multi-branch concat, each under one BatchNorm2d",
        ),
        ZooModel(
            "two_tower",
            two_tower,
            (2, 3, 24, 24),
            "two inputs (image, features): Conv-BN and Linear-BN1d towers joined by concat",
            more_inputs=((2, 12),),
        ),
        ZooModel(
            "repvgg",
            repvgg,
            (2, 3, 32, 32),
            "RepVGG blocks: 3x3 + 1x1 conv-BN + identity BN summed; stride-2 and grouped blocks",
        ),
        ZooModel(
            "mobileone",
            mobileone,
            (2, 3, 32, 32),
            "MobileOne blocks: over-parameterized depthwise/pointwise conv-BN branches, identity BN",
        ),
        ZooModel("acnet", acnet, (2, 3, 32, 32), "ACNet blocks: 3x3 + 1x3 + 3x1 conv-BN branches summed"),
    )
}


def example_inputs(name: str, *, batch: int | None = None, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Seeded random inputs for zoo entry ``name``; ``batch`` overrides the batch dimension."""
    try:
        entry = ZOO[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; known models: {', '.join(ZOO)}") from None
    generator = torch.Generator().manual_seed(seed)
    return tuple(
        random_input(shape if batch is None else (batch, *shape[1:]), generator)
        for shape in entry.input_shapes
    )


def spec_of(factory: Callable[..., nn.Module]) -> ZooModel | None:
    """The zoo entry whose factory is ``factory`` (by identity), or None."""
    return next((m for m in ZOO.values() if m.factory is factory), None)


# a spec "normfold.models:<name>" given without inputs runs on the entry's shapes (normfold.io.factory)
for _entry in ZOO.values():
    register_input_shapes(_entry.factory, _entry.input_shapes)

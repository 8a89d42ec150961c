"""Reference model zoo for normfold: small, seeded models with realistic BatchNorm state.

Every factory is importable as ``normfold.models:<name>`` (a factory spec for the CLI); see
:mod:`normfold.models.zoo` for the models and :data:`ZOO` for the registry.
"""

from normfold.models.zoo import (
    MLP,
    ZOO,
    AudioCNN,
    BasicBlock,
    Decoder,
    InvertedResidual,
    Mixed,
    MobileNet,
    ResNet,
    VideoCNN,
    ZooModel,
    audio_cnn,
    calibrate,
    decoder,
    example_inputs,
    mixed,
    mlp,
    mobilenet,
    resnet,
    spec_of,
    video_cnn,
)

__all__ = [
    "MLP",
    "ZOO",
    "AudioCNN",
    "BasicBlock",
    "Decoder",
    "InvertedResidual",
    "Mixed",
    "MobileNet",
    "ResNet",
    "VideoCNN",
    "ZooModel",
    "audio_cnn",
    "calibrate",
    "decoder",
    "example_inputs",
    "mixed",
    "mlp",
    "mobilenet",
    "resnet",
    "spec_of",
    "video_cnn",
]

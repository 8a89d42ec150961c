"""Shared test helpers: realistic BatchNorm statistics and byte-level state comparison."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normfold.reference import _ProgramModule


def randomize_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm in ``module`` non-trivial statistics and affine parameters.

    Parity tests must never run on the default mean 0 / var 1 / gamma 1 / beta 0, which would
    hide a fold that forgets one of them.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if not isinstance(m, _BatchNorm):
                continue
            c = m.num_features
            if m.running_mean is not None:
                dtype = m.running_mean.dtype
                m.running_mean.copy_((torch.randn(c, generator=gen) + 0.5).to(dtype))
                m.running_var.copy_((torch.rand(c, generator=gen) * 2.8 + 0.2).to(dtype))
            if m.affine:
                dtype = m.weight.dtype
                m.weight.copy_((torch.rand(c, generator=gen) + 0.5).to(dtype))
                m.bias.copy_((torch.randn(c, generator=gen) * 0.5).to(dtype))
    return module.eval()


def state_bytes(module: nn.Module) -> dict[str, bytes]:
    """Raw bytes of every state_dict entry (bf16 included), for byte-identity checks."""
    return {
        k: v.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() + str(v.dtype).encode()
        for k, v in module.state_dict().items()
    }


def count_bn(module: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in module.modules())


def bn_ops(program: torch.export.ExportedProgram) -> int:
    """batch_norm ops left in an exported program."""
    return sum(n.target is torch.ops.aten.batch_norm.default for n in program.graph.nodes)


def exported(program: torch.export.ExportedProgram) -> nn.Module:
    """An exported program as a module ``verify`` can run (normfold's own wrapper)."""
    return _ProgramModule(program)


#: zoo model -> {kept norm: code} with reparameterization (the CLI's default); every other norm op folds
ZOO_KEPT_REPARAM = {
    "mixed": {
        "bn_shared": "shared_producer",
        "bn_nostats": "batch_statistics",
        "bn_after_relu": "zero_padding_forward",
        "bn_two_users": "multiple_users",
        "bn_seq": "wrong_axis",
    },
}
#: the same without reparameterization (``normfold.fold``'s default): identity-branch norms stay
ZOO_KEPT = {
    **ZOO_KEPT_REPARAM,
    "repvgg": {f"stages.{i}.rbr_identity": "multiple_users" for i in (1, 3, 4)},
    "mobileone": {f"stages.{i}.rbr_skip": "multiple_users" for i in (1, 4)},
}
#: zoo model -> blocks reparameterization merges into one conv (every block of the model)
ZOO_MERGED = {
    "repvgg": {f"stages.{i}" for i in range(5)},
    "mobileone": {f"stages.{i}" for i in range(5)},
    "acnet": {f"features.{i}" for i in (0, 2, 4)},
}
#: zoo model -> norms folded in the export only (written in a forward, not a removable module)
ZOO_EXPORT_ONLY = {
    "functional": {"bn1", "bn2", "bn_fc"},
    "custom_bn": {"forward:sub_1"},
    "inception_next": {"blocks.0:mul", "blocks.1:mul_1"},  # layer scale in the block's forward
}
#: zoo model -> (norm, pattern, through) folds that show one pattern each
ZOO_SHOWS = {
    "levit": [("attn.qkv.bn", "linear-bn", ("flatten_1",)), ("head_bn", "bn-linear", ())],
    "inception_next": [("blocks.0.norm", "bn-conv", ())],
    "bn_head": [("head_norm", "bn-linear", ("adaptive_avg_pool2d", "flatten"))],
    "mixed_kernel": [("bn_mix", "concat-bn", ("cat",))],
    "custom_bn": [("norm2:sub", "conv-affine", ()), ("forward:sub_1", "conv-affine", ())],
    "bn_act": [("bn_stem", "conv-bn", ())],
    "same_pad": [("bn_stem", "conv-bn", ())],
    "functional": [("bn_fc", "linear-bn", ())],
}


class Pair(nn.Module):
    """A user's own class: producer -> norm -> activation."""

    def __init__(self, producer: nn.Module, norm: nn.Module) -> None:
        super().__init__()
        self.producer = producer
        self.norm = norm

    def forward(self, x):
        return torch.relu(self.norm(self.producer(x)))

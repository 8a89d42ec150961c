"""normfold.prepare: the working copy of fold() (modules copied first, tensors once the plan is applied).

A fold with ``inplace=False`` must hand out a model and a program that own every tensor: nothing the
caller does to its model afterwards (an optimizer step, a buffer a forward updates) may reach them,
and nothing fold() runs may reach the caller's model.
"""

from __future__ import annotations

import torch
from helpers import randomize_bn
from torch import nn

import normfold
from normfold.prepare import borrowing_copy, own_tensors


def _storages(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor) and t.numel()}


def _model_storages(module: nn.Module) -> set[int]:
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    return _storages(t for _, t in named)


def _program_storages(program: torch.export.ExportedProgram) -> set[int]:
    return _storages([*program.state_dict.values(), *program.constants.values()])


class Counted(nn.Module):
    """Conv -> BN -> ReLU -> pool -> Linear (left unchanged by the fold), a spare weight tied to
    the conv's, a non-persistent buffer, and a forward that counts its calls in a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)
        self.spare = nn.Conv2d(3, 8, 3)
        self.spare.weight = self.conv.weight
        self.register_buffer("shift", torch.linspace(-1.0, 1.0, 5), persistent=False)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return torch.maximum(self.head(h), self.shift)  # no affine map: the head stays unchanged


def _counted() -> Counted:
    torch.manual_seed(0)
    return randomize_bn(Counted()).eval()


def test_the_folded_model_and_program_share_no_tensor_with_the_callers_model() -> None:
    model = _counted()
    x = torch.randn(2, 3, 6, 6)
    result = normfold.fold(model, x)
    assert [f.norm for f in result.folded] == ["bn"]
    mine = _model_storages(model)
    assert not mine & _model_storages(result.model)
    assert not mine & _program_storages(result.program)
    # the unchanged head: equal values in a tensor of its own, which the program shares
    assert torch.equal(result.model.head.weight, model.head.weight)
    assert result.model.head.weight is not model.head.weight
    assert result.program.state_dict["head.weight"] is result.model.head.weight
    assert result.model.spare.weight is result.model.conv.weight  # a tie stays a tie
    assert int(model.calls) == 0  # fold() never ran the caller's forward, nor updated its buffer


def test_changing_the_callers_model_afterwards_changes_nothing_handed_out() -> None:
    model = _counted()
    x = torch.randn(2, 3, 6, 6)
    result = normfold.fold(model, x)
    program = result.program.module()
    before = (result.model(x), program(x))
    with torch.no_grad():  # an optimizer step on the caller's model
        for p in model.parameters():
            p.add_(1.0)
        model.shift.mul_(3.0)
    after = (result.model(x), program(x))
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_a_model_folded_in_parts_owns_its_tensors() -> None:
    """The parts' path runs the copy's forward (to find the parts' inputs): by then the copy's
    buffers must be its own, or the caller's counter would move."""

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = _counted()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.inner(x)
            if float(y.sum()) > 0:  # data-dependent: no capture of the whole model
                return y
            return -y

    model = Branchy().eval()
    result = normfold.fold(model, torch.randn(2, 3, 6, 6))
    assert result.uncaptured and [f.norm for f in result.folded] == ["inner.bn"]
    assert int(model.inner.calls) == 0
    assert not _model_storages(model) & _model_storages(result.model)


def test_borrowing_copy_shares_tensors_until_own_tensors_and_keeps_ties_and_views() -> None:
    model = _counted()
    base = torch.arange(12.0)
    model.register_buffer("left", base[:6])
    model.register_buffer("right", base[6:])  # two views of one storage
    copy, borrowed = borrowing_copy(model, "fold")
    assert copy is not model and copy.conv is not model.conv
    assert copy.conv.weight is model.conv.weight and model.calls.untyped_storage().data_ptr() in borrowed
    state = dict(copy.state_dict(keep_vars=True))
    own_tensors(copy, borrowed, (state,))
    assert not _model_storages(model) & _model_storages(copy)
    assert copy.spare.weight is copy.conv.weight
    assert copy.left.untyped_storage().data_ptr() == copy.right.untyped_storage().data_ptr()
    assert state["conv.weight"] is copy.conv.weight and state["calls"] is copy.calls
    assert isinstance(copy.conv.weight, nn.Parameter) and copy.conv.weight.requires_grad


class _StdConv(nn.Conv2d):
    """A weight-standardized conv (timm's StdConv2d): its weight's batch norm is a constant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.weight.reshape(1, self.out_channels, -1)
        w = torch.nn.functional.batch_norm(flat, None, None, training=True, momentum=0.0, eps=1e-6)
        return torch.nn.functional.conv2d(x, w.reshape_as(self.weight), self.bias)


def test_a_float64_value_returned_as_is_is_no_shared_tensor() -> None:
    """In float64 ``bias.to(torch.float64)`` is the caller's bias itself: the program held it
    under a new Parameter object until own_tensors matched borrowed tensors by storage."""
    torch.manual_seed(0)
    model = nn.Sequential(_StdConv(3, 6, 3), nn.ReLU()).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    result = normfold.fold(model, x)
    assert [(f.norm, f.pattern) for f in result.folded] == [("0", "weight_std")]
    mine = _model_storages(model)
    assert not mine & _model_storages(result.model) and not mine & _program_storages(result.program)


def test_an_lstm_in_the_result_lists_its_own_weights() -> None:
    """``nn.LSTM`` keeps its weights in a plain list as well as in its parameters."""

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv1d(4, 8, 3, padding=1), nn.BatchNorm1d(8)
            self.rnn = nn.LSTM(8, 5, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.rnn(self.bn(self.conv(x)).transpose(1, 2))[0]

    torch.manual_seed(0)
    model = randomize_bn(Tagger()).eval()
    result = normfold.fold(model, torch.randn(2, 4, 7))
    caller = {id(t) for t in model.rnn._flat_weights}
    assert not caller & {id(t) for t in result.model.rnn._flat_weights}

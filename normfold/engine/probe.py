"""Probes: running a user's layer subclass on a made-up input without touching global state.

A Conv/Linear subclass with its own ``forward`` is run once on a copy to learn how it treats its
``bias`` (:mod:`normfold.engine.apply`, :mod:`normfold.transforms.bias`). The input comes from a private
``torch.Generator`` seeded with a constant, so the probe is the same on every call and the
global RNG a user seeded for their own pipeline is never drawn from; the probe's own forward runs
under :func:`torch.random.fork_rng`, so a forward that draws random numbers itself (a dropout in
training mode, noise) leaves the global state as it found it too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

#: the private generator's seed: any constant, so a probe is reproducible
SEED = 0x6E66  # "nf"


def probe_input(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A standard normal tensor drawn from a private generator (CPU, then moved to ``device``)."""
    gen = torch.Generator().manual_seed(SEED)
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


@contextmanager
def isolated_rng(device: torch.device | str) -> Iterator[None]:
    """The global RNG state of the CPU (and of ``device``, a CUDA device) restored on exit,
    whatever the block draws."""
    device = torch.device(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield

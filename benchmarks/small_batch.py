"""Small-batch fine-tuning with BatchNorm, GroupNorm, LayerNorm and frozen BN; stale vs recalibrated folds.

    python benchmarks/small_batch.py [--plot small_batch.png] [--steps 1500]

The default 1,500 fine-tuning steps of four variants take about 45 minutes on 2 loaded CPU cores
(``--steps 300``: about 10). The table is printed; ``--plot FILE`` also draws the curves (needs
matplotlib: ``pip install -e ".[bench]"``; checked before any training) into FILE, which must not
exist (``--force`` replaces it; the committed ``benchmarks/small_batch.png`` is only replaced when
named).

Task (synthetic but learnable, seeded): 4 classes of 3x16x16 images, each a fixed random template
plus noise, with a per-domain brightness and contrast. The zoo ResNet is

1. trained with BatchNorm at batch 64 on domain A;
2. fine-tuned at batch 2 on domain B (another brightness/contrast) with (a) BatchNorm as is,
   (b) ``swap_norms(to="group")``, (c) ``"frozen"``, (d) ``"layer"``; each is evaluated in eval
   mode on held-out domain-B data every ``--eval-every`` steps;
3. and, before fine-tuning, the domain-A model is folded for domain B with its stale statistics
   and after ``recalibrate`` on 32 unlabeled domain-B batches: loss and accuracy of each.

The numbers are what this seeded run gives on this machine, whatever they show.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from normfold.models import resnet
from torch import nn

import normfold
from normfold.transforms.swap import swap_norms

CLASSES, SIZE = 4, 16
SHIFT = (2.0, 0.3)  # domain B: brightness, contrast (domain A: 0, 1)


class Domain:
    """Seeded images of CLASSES templates with a domain's brightness and contrast."""

    def __init__(self, templates: torch.Tensor, brightness: float, contrast: float, seed: int) -> None:
        self.templates, self.brightness, self.contrast = templates, brightness, contrast
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, CLASSES, (n,), generator=self.gen)
        noise = torch.randn(n, 3, SIZE, SIZE, generator=self.gen) * 2.0
        return self.contrast * (self.templates[y] + noise) + self.brightness, y


def evaluate(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        losses, correct, total = 0.0, 0, 0
        for x, y in data:
            out = model(x)
            losses += F.cross_entropy(out, y, reduction="sum").item()
            correct += int((out.argmax(1) == y).sum())
            total += len(y)
    return losses / total, correct / total


def train(model: nn.Module, domain: Domain, steps: int, batch: int, lr: float, hook=None) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for step in range(steps):
        model.train()
        x, y = domain.batch(batch)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the same clipping for every variant
        opt.step()
        if hook is not None:
            hook(step + 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", metavar="FILE", help="also draw the curves into FILE (needs matplotlib)")
    parser.add_argument("--force", action="store_true", help="replace an existing --plot FILE")
    parser.add_argument("--steps", type=int, default=1500, help="fine-tuning steps at batch 2")
    parser.add_argument("--eval-every", type=int, default=100)
    args = parser.parse_args()
    if args.plot is not None:  # decided before 45 minutes of training, not after
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error('--plot needs matplotlib: pip install -e ".[bench]" (or leave --plot out)')
        if Path(args.plot).exists() and not args.force:
            parser.error(f"{args.plot} exists; pass --force to replace it")
    torch.manual_seed(0)
    start = time.perf_counter()
    templates = torch.randn(CLASSES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 0.35
    domain_a, domain_b = Domain(templates, 0.0, 1.0, 2), Domain(templates, *SHIFT, 3)
    test_b = [Domain(templates, *SHIFT, 4).batch(64) for _ in range(8)]

    base = resnet(num_classes=CLASSES)
    train(base, domain_a, steps=150, batch=64, lr=0.05)
    test_a = [Domain(templates, 0.0, 1.0, 5).batch(64) for _ in range(8)]
    print(f"pretrained on A (batch 64): loss, acc on A {evaluate(base, test_a)}, B {evaluate(base, test_b)}")

    # stale vs recalibrated statistics, folded
    example = (domain_b.batch(2)[0],)
    stale = normfold.fold(base, example).model
    unlabeled = [domain_b.batch(32)[0] for _ in range(32)]
    calibrated = normfold.recalibrate(base, unlabeled)
    fresh = normfold.fold(calibrated.model, example).model
    fold_rows = [("folded, stale statistics", *evaluate(stale, test_b)),
                 ("folded, recalibrated on B", *evaluate(fresh, test_b))]  # fmt: skip

    variants = {
        "batchnorm (batch 2)": copy.deepcopy(base),
        "groupnorm": swap_norms(base, "group").model,
        "frozen bn": swap_norms(base, "frozen").model,
        "layernorm": swap_norms(base, "layer").model,
    }
    curves: dict[str, list[tuple[int, float, float]]] = {}
    for name, model in variants.items():
        torch.manual_seed(0)
        points = [(0, *evaluate(model, test_b))]
        tune = Domain(templates, *SHIFT, 6)

        def record(step: int, model: nn.Module = model, points: list = points) -> None:
            if step % args.eval_every == 0:
                points.append((step, *evaluate(model, test_b)))

        train(model, tune, steps=args.steps, batch=2, lr=0.003, hook=record)
        curves[name] = points

    print("\n| variant | loss on B | accuracy on B |\n|---|---|---|")
    for name, loss, acc in fold_rows:
        print(f"| {name} | {loss:.3f} | {acc:.3f} |")
    for name, points in curves.items():
        _, loss, acc = points[-1]
        print(f"| fine-tuned {args.steps} steps at batch 2: {name} | {loss:.3f} | {acc:.3f} |")
    print(f"\n(total {time.perf_counter() - start:.0f} s)")
    if args.plot is not None:
        _plot(curves, args.plot)


def _plot(curves: dict[str, list[tuple[int, float, float]]], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for name, points in curves.items():
        steps = [p[0] for p in points]
        ax_loss.plot(steps, [p[1] for p in points], label=name)
        ax_acc.plot(steps, [p[2] for p in points], label=name)
    ax_loss.set(xlabel="fine-tuning step (batch 2)", ylabel="loss on domain B (eval mode)")
    ax_acc.set(xlabel="fine-tuning step (batch 2)", ylabel="accuracy on domain B (eval mode)")
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

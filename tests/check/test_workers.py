"""Verification's forwards: one intra-op thread each, independent ones side by side, the caller's
thread count, RNG state and training flags as they were afterwards, results that do not depend on
how many ran at once."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator

import pytest
import torch
from helpers import randomize_bn
from torch import nn

from normfold.check.parity import ParityRule
from normfold.check.reference import check, make_reference, parity_sets, run_model
from normfold.check.workers import run_all


@pytest.fixture
def two_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4)
    )
    return randomize_bn(model)


def test_tasks_run_on_one_thread_each_side_by_side_and_the_caller_keeps_its_count(two_threads) -> None:
    seen: list[tuple[str, int]] = []
    barrier = threading.Barrier(2, timeout=30)

    def task(i: int) -> int:
        barrier.wait()  # both tasks at once: two workers, or this times out
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return i * 10

    assert run_all([lambda i=i: task(i) for i in range(2)]) == [0, 10]
    assert {n for _, n in seen} == {1} and len({name for name, _ in seen}) == 2
    assert torch.get_num_threads() == 2


def test_one_thread_callers_run_tasks_in_their_own_thread_one_at_a_time() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        names = run_all([lambda: threading.current_thread().name] * 3)
        assert names == [threading.current_thread().name] * 3
    finally:
        torch.set_num_threads(threads)


def test_the_first_failing_task_in_order_raises_and_state_is_restored(two_threads) -> None:
    rng = torch.get_rng_state()

    def fail(message: str) -> None:
        torch.rand(3)  # draws from the global RNG: restored afterwards
        raise ValueError(message)

    with pytest.raises(ValueError, match=r"^first$"):
        run_all([lambda: 1, lambda: fail("first"), lambda: fail("second")])
    assert torch.get_num_threads() == 2
    assert torch.equal(torch.get_rng_state(), rng)


def test_reference_and_check_do_not_depend_on_the_callers_thread_count(two_threads) -> None:
    """Every forward runs single-threaded whatever the caller's count: bit-identical references
    with 2 threads (side by side) and with 1 (one after another)."""
    model = _net().train()  # a model left in train mode keeps it
    x = (torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1)),)
    rule = ParityRule()
    sets = parity_sets(x, rule)
    wide = make_reference(model, sets, rule)
    wide_report = check(wide, lambda i: run_model(model, i), rule)
    torch.set_num_threads(1)
    one = make_reference(model, sets, rule)
    torch.set_num_threads(2)
    assert all(m.training for m in model.modules())
    assert torch.get_num_threads() == 2
    trees = lambda r: [r.outputs, r.exact, r.perturbed]  # noqa: E731
    for a, b in zip(trees(wide), trees(one), strict=True):
        flat_a, flat_b = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
        assert len(flat_a) == len(flat_b) > 0
        assert all(torch.equal(p, q) for p, q in zip(flat_a, flat_b, strict=True))
    assert wide_report.passed  # the original judged against itself


def test_concurrent_forwards_of_one_model_restore_its_training_flags() -> None:
    """Two forwards of the same model at once, the second one in leaving last: the last one out
    restores the flags the first one in saved, not the eval mode its sibling had set."""
    both_in = threading.Barrier(2, timeout=30)
    entered: list[int] = []

    class Slow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert not self.training
            entered.append(len(entered))
            order = entered[-1]
            both_in.wait()
            if order == 1:
                time.sleep(0.3)  # the second one in leaves last
            return self.bn(x)

    model = Slow().train()
    x = (torch.randn(2, 3),)
    threads = [threading.Thread(target=run_model, args=(model, x)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(entered) == 2
    assert model.training and model.bn.training


def test_an_interrupt_starts_no_further_task(two_threads) -> None:
    """Ctrl-C while the forwards run: the running ones finish, the waiting ones never start."""
    started: list[int] = []

    def task(i: int) -> int:
        started.append(i)
        time.sleep(1.0)
        return i

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_all([lambda i=i: task(i) for i in range(6)])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    time.sleep(1.5)  # long enough for a worker to take another task, were any left to take
    assert 1 <= len(started) <= 2  # the two workers' first tasks only
    assert torch.get_num_threads() == 2


class _Draws(nn.Module):
    """A forward that draws from the global RNG (noise injected at inference)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand_like(x)


def test_pool_workers_never_save_or_restore_the_global_rng_and_the_pool_restores_it(
    two_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two threads saving and restoring the global RNG state at once deadlocked inside torch
    (get_rng_state against set_rng_state: a CI run hung for its whole limit). In a pool's workers
    run_model leaves the RNG state alone; the pool restores it once for all of them, so a forward
    that draws still leaves the caller's seeded stream as it was."""
    touched: list[str] = []
    real_fork = torch.random.fork_rng

    def recording_fork(*args: object, **kwargs: object):
        touched.append(threading.current_thread().name)
        return real_fork(*args, **kwargs)

    monkeypatch.setattr(torch.random, "fork_rng", recording_fork)
    x = torch.randn(2, 3)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    outs = run_all([lambda: run_model(_Draws(), (x,)) for _ in range(4)], width=2)
    assert torch.equal(torch.rand(4), expected)  # the caller's stream is as it was
    assert len(outs) == 4 and not any(name.startswith("normfold-verify") for name in touched)
    run_model(_Draws(), (x,))  # outside a pool, run_model isolates the RNG itself
    assert touched and not touched[-1].startswith("normfold-verify")


def test_a_pool_inside_single_threaded_code_is_as_wide_as_the_outermost_caller(two_threads) -> None:
    """``fold()`` runs on one intra-op thread (``single_threaded``) and computes its folded weights
    in a pool: the pool takes the caller's two threads, not the one ``fold`` set."""
    from normfold.check.workers import single_threaded

    barrier = threading.Barrier(2, timeout=30)
    with single_threaded() as outer:
        assert (outer, torch.get_num_threads()) == (2, 1)
        with single_threaded() as inner:
            assert inner == 2
            names = run_all([lambda: (barrier.wait(), threading.current_thread().name)[1] for _ in range(2)])
        assert len(set(names)) == 2 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with single_threaded() as again:  # nothing of the earlier calls left behind
        assert again == 2


def test_fold_runs_on_one_intra_op_thread_and_restores_the_callers_count(two_threads, monkeypatch) -> None:
    import normfold
    import normfold.folding as folding

    seen = []
    original = folding._fold

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(folding, "_fold", spy)
    model = _net().eval()
    x = torch.randn(2, 3, 8, 8)
    result = normfold.fold(model, x)
    assert seen == [1] and torch.get_num_threads() == 2
    assert normfold.verify(model, result, x).passed


def test_overlapping_single_threaded_sections_restore_the_callers_count(two_threads) -> None:
    """Review of fda406f: fold() in two threads at once (A enters, B enters, A leaves, B leaves)
    left the process on one thread; sections now take turns (B waits for A)."""
    from normfold.check.workers import single_threaded

    a_in, order = threading.Event(), []

    def first() -> None:
        with single_threaded() as n:
            order.append(("A", n))
            a_in.set()
            time.sleep(0.2)  # B tries to enter meanwhile

    def second() -> None:
        a_in.wait()
        with single_threaded() as n:
            order.append(("B", n))

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert order == [("A", 2), ("B", 2)] and torch.get_num_threads() == 2


def test_a_fold_inside_a_pools_task_runs_its_own_pool_inline(two_threads) -> None:
    """Review of fda406f: fold() run as a task of a pool (as a check's candidate runner) waited
    forever for the pool's lock (its folded weights are computed in a pool of their own); a worker
    now runs a nested pool's tasks itself, and leaves the process state to its pool's caller. One
    task folds, the other does not: two torch.export captures at once are not thread-safe."""
    import normfold

    model = _net().eval()
    x = torch.randn(2, 3, 8, 8)
    folded, other = run_all([lambda: normfold.fold(model, x), lambda: threading.current_thread().name])
    assert len(folded.folded) == 2 and other.startswith("normfold-verify")
    assert normfold.verify(model, folded, x).passed and torch.get_num_threads() == 2


def test_fold_in_place_under_inference_mode(two_threads) -> None:
    """Review of fda406f: the folded weights written in pool workers lost the caller's inference
    mode, and an in-place write into an inference tensor was refused."""
    import normfold

    with torch.inference_mode():
        model = _net().eval()
        x = torch.randn(2, 3, 8, 8)
        expected = model(x)
        result = normfold.fold(model, x, inplace=True)
        got = result.model(x)
    assert result.model is model and len(result.folded) == 2
    assert float((got - expected).abs().max()) <= 1e-4 * float(expected.abs().max())

"""Running verification's forwards so that a busy core does not multiply their time.

Torch's intra-op threads split every op across all cores and meet at a barrier after each one:
when another process holds one of two cores, every op waits for the thread that was preempted
(measured: verification 5x slower beside one busy loop with 2 threads, 1.08x with one thread).
So every verification forward here runs on **one** intra-op thread, and independent forwards
(one input set, one perturbed copy) run side by side in up to ``width`` Python threads (torch
releases the GIL inside its ops). A thread that is preempted delays only its own forward, and the
others take the remaining tasks from the queue, so the time degrades with the lost core's share
instead of with the number of barriers.

``width`` defaults to the caller's ``torch.get_num_threads()``: a caller who asked torch for one
thread (``OMP_NUM_THREADS=1``) gets every forward in its own thread, one after another. Each
forward runs single-threaded either way, so the results do not depend on ``width``. The caller's
thread count and global CPU RNG state are restored afterwards, once for the whole pool: a worker
never saves or restores the global RNG state itself (two threads doing so at once deadlocked
inside torch, ``get_rng_state`` against ``set_rng_state``: a CI run hung there for its whole
limit, stop 26, and again under pytest-xdist in session 9).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import TypeVar

import torch

__all__ = ["in_pool", "run_all", "single_threaded"]

T = TypeVar("T")

#: torch.set_num_threads and the RNG state are process-wide: one single-threaded section at a time
#: (a fold, a verification pool), re-entered by the thread that holds it (a fold's own checks)
_lock = threading.RLock()


_caller = threading.local()  # ``threads``: the count outside the outermost single_threaded()


@contextmanager
def single_threaded() -> Iterator[int]:
    """One intra-op thread in the calling thread; yields the caller's count (inside another
    ``single_threaded``, the outermost caller's: a pool inside ``fold()`` is as wide as the
    caller's torch), restored on exit (with the global CPU RNG state). One such section at a time
    in the process (another thread's waits: the state is process-wide). In a pool's worker (a
    fold or check run as a task) it changes nothing: the worker is on one thread already, and its
    pool's caller restores the state (a worker that saved and restored the RNG state deadlocked)."""
    if in_pool():
        yield 1
        return
    with _lock:
        threads = torch.get_num_threads()
        outer = getattr(_caller, "threads", None)
        rng = torch.get_rng_state()
        torch.set_num_threads(1)
        _caller.threads = outer if outer is not None else threads
        try:
            yield _caller.threads
        finally:
            _caller.threads = outer
            torch.set_num_threads(threads)
            torch.set_rng_state(rng)


_worker = threading.local()  # ``pooled`` is True inside a pool's worker threads


def in_pool() -> bool:
    """Whether the calling thread is one of :func:`run_all`'s workers, whose caller restores the
    global CPU RNG state once for all of them (:func:`single_threaded`)."""
    return getattr(_worker, "pooled", False)


def _one_thread(task: Callable[[], T], grad: bool, inference: bool) -> T:
    torch.set_num_threads(1)  # OpenMP's thread count is per thread: set it in each worker too
    _worker.pooled = True
    # the caller's autograd modes are per thread too: a fold(inplace=True) under inference_mode
    # writes into inference tensors, which only inference mode may
    with torch.inference_mode(inference), torch.set_grad_enabled(grad):
        return task()


def run_all(tasks: Sequence[Callable[[], T]], width: int | None = None, *, cpu: bool = True) -> list[T]:
    """The results of ``tasks`` in their order, each run on one intra-op thread, up to ``width``
    (default: the caller's ``torch.get_num_threads()``) at once; ``cpu=False`` (a model on an
    accelerator) runs them one after another, where host threads buy nothing. The first task
    (in order) that raised re-raises its exception, once every task has run. Called from a pool's
    worker (a fold inside a check's task), the tasks run there, one after another."""
    if in_pool():  # the pool's caller holds the section: a second pool would wait for it forever
        return [task() for task in tasks]
    with single_threaded() as threads:
        width = max(1, min(width if width is not None else threads, len(tasks)))
        if width == 1 or not cpu:
            return [task() for task in tasks]
        pool = ThreadPoolExecutor(max_workers=width, thread_name_prefix="normfold-verify")
        try:
            modes = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
            futures = [pool.submit(_one_thread, task, *modes) for task in tasks]
            wait(futures)
        finally:  # interrupted (Ctrl-C): the tasks not started yet never start
            pool.shutdown(wait=True, cancel_futures=True)
        return [f.result() for f in futures]

"""The kit's one timer and its memory probes: every benchmark, cost table and profile measures with these.

* :func:`timed`: wall times of ``fn()`` after a warm-up, synchronising CUDA around each call;
  :func:`stats` gives the median and quartiles.
* :func:`alternated`: the times of two callables measured in alternation (a b, b a, a b, ...), so
  that a drift of a shared machine's speed hits both alike. Compare *ratios* measured this way,
  never two absolute times from different runs.
* :func:`peak_memory`: the most bytes torch allocated while ``fn()`` ran (CUDA:
  ``max_memory_allocated``; CPU: the profiler's memory events, :func:`memory_profile`).
  :class:`RSSPeak`: the process's resident-set peak, sampled by a thread (what the operating system
  sees, allocator caches included).

Not here: what is measured (``kit.measure.bench``, ``kit.measure.complexity``, ``kit.measure.bench_separable``).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from typing import Callable

import torch

__all__ = ["sync", "timed", "stats", "alternated", "peak_memory", "memory_profile", "RSSPeak", "quiet_stderr",
           "torch_threads"]


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued CUDA work on ``device`` (nothing on CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _check(repeats: int, warmup: int) -> None:
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")


def timed(fn: Callable[[], object], *, repeats: int = 7, warmup: int = 2, device=None) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn()``, after ``warmup`` untimed calls."""
    _check(repeats, warmup)
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def stats(times: list[float]) -> dict:
    """``{"median", "q25", "q75", "times"}`` of a list of times."""
    q = statistics.quantiles(times, n=4) if len(times) > 1 else times * 3
    return {"median": statistics.median(times), "q25": q[0], "q75": q[2], "times": list(times)}


def alternated(a: Callable[[], object], b: Callable[[], object], *, rounds: int = 9, warmup: int = 2,
               device=None) -> tuple[list[float], list[float]]:
    """Times of ``a()`` and of ``b()``, one of each per round, the order alternating (a b, b a, ...)."""
    _check(rounds, warmup)
    for _ in range(warmup):
        a(), b()
    ta, tb = [], []
    for i in range(rounds):
        for fn, out in (((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta))):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            out.append(time.perf_counter() - t)
    return ta, tb


def memory_profile(fn) -> tuple[int, int]:
    """``(peak, retained)``: the most bytes of CPU memory torch held while ``fn()`` ran, and what
    it still holds when ``fn`` returns (e.g. tensors saved for the backward), both above what was
    live before: the running sum of the allocator's own events (every allocation and free, with
    its time stamp), in time order.

    Where this torch does not expose the allocator events, the running sum of every profiler op's
    own allocations and frees is used instead; that one books the frees of an op's temporaries at
    the op's end, so it overstates the peak of ops that allocate and free inside (an
    ``autograd.Function`` working in chunks)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    except (AttributeError, RuntimeError):             # pragma: no cover -- older / other builds
        events = None
    if events is not None:
        live = peak = 0
        for _, nbytes in sorted(events, key=lambda e: e[0]):
            live += nbytes
            peak = max(peak, live)
        return peak, live
    # pragma: no cover -- fallback: op-level bookkeeping; a leaf op allocates when it starts, what an
    # enclosing op's own record holds (frees of its temporaries) happens when it ends
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.end if e.cpu_children else e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak, live


def peak_memory(fn, *, device=None) -> int:
    """Peak bytes allocated by torch while ``fn()`` runs, above what was allocated before."""
    if device is not None and torch.device(device).type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    with quiet_stderr():                              # the profiler's C++ start/stop lines
        return memory_profile(fn)[0]


@contextlib.contextmanager
def torch_threads(n: int | None):
    """``torch.set_num_threads(n)`` for the block (``None``: leave it), the previous setting restored after."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 (C++ libraries write there directly) for the block."""
    import sys
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class RSSPeak:
    """Context manager: peak resident set size above the starting level (``.peak``, bytes), sampled by
    a background thread every ``interval`` seconds."""

    def __init__(self, interval: float = 0.001):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def _rss() -> int:
        try:
            import psutil
            return psutil.Process(os.getpid()).memory_info().rss
        except ImportError:                                             # pragma: no cover
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self.base)
            time.sleep(self.interval)

    def __enter__(self):
        self.base = self._rss()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss() - self.base)

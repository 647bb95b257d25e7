"""Timing, peak memory and the hardware ceilings of the benchmarks (bench/suite.py).

``time_ms`` and ``peak_mem_mb`` are the device-agnostic entry points (one implementation
per device type); ``measure_ceilings`` measures the copy and matmul ceilings the rows are
compared with.

How things are timed
--------------------
* Forward: the op called on inputs that do not require grad (no autograd graph recorded).
* Backward: for each input set the forward is run once, outside the timed region, on
  inputs that require grad, and an upstream gradient is drawn once per output. The timed
  call is ``torch.autograd.grad(outputs, inputs, upstream, retain_graph=True)``: the
  backward alone, exactly what autograd runs for that op, with no fwd+bwd minus fwd
  subtraction (whose noise would be as large as a fast backward).
* Forward + backward (``fwd+bwd``): the forward on inputs that require grad and
  ``torch.autograd.grad`` of its outputs, both in the timed call, as a training step runs
  them (the upstream gradient is drawn once, on the first call).
* On CUDA: a pair of CUDA events around every call, the median over --reps calls after
  --warmup calls (which also absorb Triton's JIT and torch.compile's compilation). Before
  each timed call the GPU spins for about half a millisecond (``torch.cuda._sleep``), so
  the host has queued the whole call before the GPU reaches the start event: the events
  measure GPU time, not Python dispatch. We do not flush L2 by writing a big buffer (the
  dirty lines it leaves would be written back during the timed call); instead inputs rotate
  among N_SETS sets, each set larger than the 50 MB L2 at full size, so no call finds its
  inputs left in L2 by the call before.
* On the CPU (``--smoke``): ``time.perf_counter`` around each call, the same median.

Peak memory is what one call allocates above what was live before it (outputs and
temporaries), in MiB.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from llama_fast.bench.cases import DTYPE, _randn

MiB = 2**20
COPY_BYTES = 2**30  # the copy ceiling's buffer: far larger than L2
MATMUL_N = 8192  # the matmul ceiling: bf16 (N, N) @ (N, N)
HEAD_START_CYCLES = 1_000_000  # ~0.5 ms of GPU spin before each timed call (see the module docstring)


def _spin(cycles: int) -> None:
    # torch.cuda._sleep is private but long-standing; without it the host merely has no head start.
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is not None:
        sleep(cycles)


def _time_cuda(calls: list[Callable], warmup: int, reps: int) -> float:
    for i in range(warmup):
        calls[i % len(calls)]()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for i, (start, end) in enumerate(events):
        _spin(HEAD_START_CYCLES)  # the host queues the call while the GPU spins
        start.record()
        calls[i % len(calls)]()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def _time_wall(calls: list[Callable], warmup: int, reps: int) -> float:
    for i in range(warmup):
        calls[i % len(calls)]()
    times = []
    for i in range(reps):
        start = time.perf_counter()
        calls[i % len(calls)]()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def time_ms(calls: list[Callable], device: torch.device, warmup: int, reps: int) -> float:
    """Median milliseconds of one call, rotating through ``calls`` (one per input set)."""
    timer = _time_cuda if device.type == "cuda" else _time_wall
    return timer(calls, warmup, reps)


def peak_mem_mb(call: Callable, device: torch.device) -> float | None:
    """MiB one call allocates above what was live before it; None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak / MiB



def measure_ceilings(ceilings: dict, device: torch.device, warmup: int, reps: int) -> dict:
    """A 1 GiB device-to-device copy (read + write bytes) -> ceilings["copy_gbps"], and a bf16
    MATMUL_N^3 matmul -> ceilings["bf16_tflops"], each filled in as soon as it is measured;
    returns the raw timings."""
    src = torch.empty(COPY_BYTES // 2, dtype=DTYPE, device=device).normal_()
    dst = torch.empty_like(src)
    copy_ms = time_ms([lambda: dst.copy_(src)], device, warmup, reps)
    ceilings["copy_gbps"] = round(2 * COPY_BYTES / (copy_ms * 1e6), 1)  # read + write
    del src, dst
    a = _randn(MATMUL_N, MATMUL_N, device=device)
    b = _randn(MATMUL_N, MATMUL_N, device=device)
    mm_ms = time_ms([lambda: a @ b], device, warmup, reps)
    ceilings["bf16_tflops"] = round(2 * MATMUL_N**3 / (mm_ms * 1e9), 1)
    return {"status": "ok", "copy_ms": round(copy_ms, 5), "matmul_ms": round(mm_ms, 5),
            "copy_bytes": COPY_BYTES, "matmul_n": MATMUL_N}
